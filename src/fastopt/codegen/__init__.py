"""The C library's rule-specific code, generated from the rule table.

``python -m fastopt.codegen`` rewrites the generated files of ``csrc/`` from
:data:`fastopt.rules.RULES` and :mod:`fastopt.kernels.elements`;
``python -m fastopt.codegen --check`` exits 1 listing the files that are stale
(the test suite runs the same check). The generated files are committed, so
``csrc/`` stays a standalone C99 library that builds without Python.

* :mod:`.translate`: restricted Python -> C (element, compute, relation, when);
* :mod:`.c_library`: the files, from the table.
"""
