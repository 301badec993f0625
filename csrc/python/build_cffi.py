"""Emit the C source of the cffi extension ``fastopt._c`` (API mode).

Run by CMakeLists.txt at build time: ``python build_cffi.py fastopt.h out.c``.
The declarations come from the public header itself (the part between its
``cffi:`` markers, with the ``FASTOPT_API`` visibility macro dropped), so the
binding cannot drift from the header. The generated module calls the library
through ordinary C calls: no libffi, no dlopen at call time.
"""
import sys

import cffi

BEGIN = "/* ---- cffi: the declarations below are parsed by the Python binding ---- */"
END = "/* ---- cffi: end ---- */"


def declarations(header_text: str) -> str:
    try:
        body = header_text.split(BEGIN, 1)[1].split(END, 1)[0]
    except IndexError:
        raise SystemExit(f"build_cffi.py: the cffi markers are missing from the header: {BEGIN!r} ... {END!r}")
    return body.replace("FASTOPT_API ", "")


def main(header: str, out: str) -> None:
    with open(header, encoding="utf-8") as f:
        cdef = declarations(f.read())
    ffi = cffi.FFI()
    ffi.cdef(cdef)
    ffi.set_source("fastopt._c", '#include "fastopt.h"')
    ffi.emit_c_code(out)


if __name__ == "__main__":
    main(*sys.argv[1:])
