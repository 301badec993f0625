"""Emit the C source of the cffi extension ``fastopt._c`` (API mode).

Run by CMakeLists.txt at build time:
``python build_cffi.py fastopt.h fastopt_rules.h out.c`` (headers, then the output).
The declarations come from the public headers themselves (the part of each
between its ``cffi:`` markers, with the ``FASTOPT_API`` visibility macro
dropped), so the binding cannot drift from the headers. ``fastopt_rules.h``
is generated from the rule table (``python -m fastopt.codegen``). The generated
module calls the library through ordinary C calls: no libffi, no dlopen at call
time.
"""
import sys

import cffi

BEGIN = "/* ---- cffi: the declarations below are parsed by the Python binding ---- */"
END = "/* ---- cffi: end ---- */"


def declarations(header_text: str, name: str = "the header") -> str:
    try:
        body = header_text.split(BEGIN, 1)[1].split(END, 1)[0]
    except IndexError:
        raise SystemExit(f"build_cffi.py: the cffi markers are missing from {name}: {BEGIN!r} ... {END!r}")
    return body.replace("FASTOPT_API ", "")


def main(*args: str) -> None:
    if len(args) < 2:
        raise SystemExit("usage: build_cffi.py HEADER... OUT.c")
    *headers, out = args
    cdef = []
    for header in headers:
        with open(header, encoding="utf-8") as f:
            cdef.append(declarations(f.read(), header))
    ffi = cffi.FFI()
    ffi.cdef("\n".join(cdef))
    ffi.set_source("fastopt._c", '#include "fastopt.h"')
    ffi.emit_c_code(out)


if __name__ == "__main__":
    main(*sys.argv[1:])
