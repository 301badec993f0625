"""Restricted Python -> C, over :mod:`ast`: the part of the C generator that reads code.

Two dialects, both described in :mod:`fastopt.rule`:

* element functions (:mod:`fastopt.kernels.elements`): per-element math in the
  buffer dtype ``T``; ``s.<field>`` reads the scalars; ``if``/``else`` and
  ternaries on loop-invariant conditions (``s.<flag>``, ``s.<field> != 0``)
  become the loop's specialization flags (``FO_SPECn``), other conditions
  stay per-element C;
* compute functions, relation predicates and ``when`` expressions: double
  precision (hyperparameters), ``int64_t`` (``step``) and ``int`` (flags), with
  Python's mixed int/float arithmetic spelled out as explicit ``(double)``
  conversions at the operation where Python converts. They call ``math.sqrt``
  and ``abs``; compute functions also ``math.log`` and ``math.exp`` (C's
  ``log`` and ``exp``, the C library's libm functions that Python's math
  module calls too, as ``**`` is ``pow``). Python raises where C returns a
  non-finite value (``math.log`` of a number <= 0, ``math.exp`` past ~709.78):
  a compute function keeps their arguments in range (a guarded ``a if c else
  b`` evaluates only the arm it takes, in both languages).

Anything outside the dialect raises :class:`TranslationError` naming the rule,
the function and the line. The output keeps Python's operation order exactly
(parentheses only where C's precedence would otherwise regroup), so that with
``-ffp-contract=off`` C rounds like Python and NumPy.
"""
from __future__ import annotations

import ast
import inspect
import textwrap
from dataclasses import dataclass, field
from typing import Callable, Optional

__all__ = ["TranslationError", "Source", "source_of", "parse_expr", "ElementC", "translate_element",
           "ComputeC", "translate_compute", "translate_relation", "translate_when", "translate_value",
           "flag_name"]

# C's words and the generated code's own names: a Python name equal to one of
# these would not mean in C what it means in Python.
C_RESERVED = frozenset("""
auto break case char const continue default do double else enum extern float for goto if inline int long
register restrict return short signed sizeof static struct switch typedef union unsigned void volatile while
_Bool _Complex _Imaginary int64_t uint64_t int32_t size_t NULL
T N SFX SQRT FABS COPYSIGN FO_INLINE pow sqrt fabs copysign log exp llabs isfinite fo_nonneg fo_unit fo_unit_closed
fo_warmup
""".split())

# C precedence levels of the operators the translator emits (higher binds tighter).
_PREC = {ast.Or: 1, ast.And: 2, "cmp": 4, ast.Add: 6, ast.Sub: 6, ast.Mult: 7, ast.Div: 7}
_ATOM = 10
_UNARY = 8
_BINOPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
_CMPOPS = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">="}


class TranslationError(ValueError):
    """Python the C generator cannot translate; the message names the rule, function and line."""


@dataclass
class Source:
    """A parsed function with the context error messages need."""
    node: ast.FunctionDef
    where: str  # "rule adam, compute function _adam (src/fastopt/rules.py)"
    first_line: int  # line of the function in its file, for messages

    def error(self, node: Optional[ast.AST], message: str) -> TranslationError:
        line = self.first_line + getattr(node, "lineno", 1) - 1 if node is not None else self.first_line
        return TranslationError(f"{self.where}, line {line}: {message}")


def source_of(fn: Callable, where: str) -> Source:
    """Parse a Python function (its source file must be available)."""
    try:
        lines, first = inspect.getsourcelines(fn)
        path = inspect.getsourcefile(fn) or "?"
    except (OSError, TypeError) as exc:
        raise TranslationError(f"{where}: the source of {getattr(fn, '__name__', fn)!r} is unavailable ({exc})")
    tree = ast.parse(textwrap.dedent("".join(lines)))
    node = tree.body[0]
    if not isinstance(node, ast.FunctionDef):
        raise TranslationError(f"{where}: {fn!r} is not a plain function (def)")
    short = path.replace("\\", "/")
    if "/src/fastopt/" in short:
        short = "src/fastopt/" + short.split("/src/fastopt/", 1)[1]
    return Source(node, f"{where} ({short})", first)


def parse_expr(text: str, where: str) -> ast.expr:
    try:
        return ast.parse(text, mode="eval").body
    except SyntaxError as exc:
        raise TranslationError(f"{where}: {text!r} is not a Python expression ({exc.msg})") from None


def _c_double(value: float, src: Source, node: ast.AST) -> str:
    if value != value or value in (float("inf"), float("-inf")):
        raise src.error(node, f"the literal {value!r} has no C spelling here")
    text = repr(float(value))
    return text if any(ch in text for ch in ".en") else text + ".0"


def _wrap(text: str, prec: int, need: int) -> str:
    return f"({text})" if prec < need else text


def flag_name(cond: ast.expr) -> str:
    """A C identifier for a loop-invariant condition: ``s.amsgrad`` -> ``f_amsgrad``,
    ``s.weight_decay != 0`` -> ``f_weight_decay``."""
    parts = []
    for node in ast.walk(cond):
        if isinstance(node, ast.Attribute) and node.attr not in parts:
            parts.append(node.attr)
        elif isinstance(node, ast.Name) and node.id != "s" and node.id not in parts:
            parts.append(node.id)
        elif isinstance(node, ast.Not):
            parts.append("not")
    return "f_" + "_".join(parts)


# ---- element functions ------------------------------------------------------------

@dataclass
class ElementC:
    """One element function in C (a body for ``rules_kernels.inc``)."""
    name: str
    params: list[str]  # Python parameter names: p, g, states..., s
    flags: list[tuple[str, ast.expr]] = field(default_factory=list)  # (C name, condition over s.<field>)
    locals: list[str] = field(default_factory=list)
    body: list[str] = field(default_factory=list)  # C statements, indented by 4
    returns: list[str] = field(default_factory=list)  # C expressions: new p, new states


def _invariant(node: ast.expr, fields: set) -> bool:
    """True when ``node`` depends only on the scalars (so it is the same for every element)."""
    saw = False
    for sub in ast.walk(node):
        if isinstance(sub, ast.Attribute):
            if not (isinstance(sub.value, ast.Name) and sub.value.id == "s"):
                return False
            saw = True
        elif isinstance(sub, ast.Name) and sub.id != "s":
            return False
        elif isinstance(sub, ast.Call):
            return False
    return saw


class _ElementTranslator:
    def __init__(self, src: Source, fields: dict[str, type], flag_conditions: list[ast.expr]):
        self.src = src
        self.fields = fields
        self.flags: list[tuple[str, ast.expr]] = []
        self._flag_keys: dict[str, str] = {}
        for cond in flag_conditions:  # conditions the caller wants as flags (the buffers' `when`)
            self.flag(cond)
        self.locals: list[str] = []
        self.params: list[str] = []

    def flag(self, cond: ast.expr) -> str:
        key = ast.dump(cond)
        if key not in self._flag_keys:
            name = flag_name(cond)
            taken = {n for n, _ in self.flags}
            base, k = name, 2
            while name in taken:
                name, k = f"{base}_{k}", k + 1
            self._flag_keys[key] = name
            self.flags.append((name, cond))
        return self._flag_keys[key]

    # expressions -> (C text, precedence)
    def expr(self, node: ast.expr) -> tuple[str, int]:
        src = self.src
        if isinstance(node, ast.Name):
            if node.id not in self.locals and node.id not in self.params:
                raise src.error(node, f"{node.id!r} is not a parameter or an earlier assignment")
            if node.id == self.params[-1]:
                raise src.error(node, f"the scalars {node.id!r} can only be read as {node.id}.<field>")
            return node.id, _ATOM
        if isinstance(node, ast.Attribute):
            if not (isinstance(node.value, ast.Name) and node.value.id == self.params[-1]):
                raise src.error(node, f"attribute {ast.unparse(node)!r}: only {self.params[-1]}.<field> is "
                                      "allowed")
            if node.attr not in self.fields:
                raise src.error(node, f"{node.attr!r} is not a field of the scalars")
            return f"s->{node.attr}", _ATOM
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, int):
                raise src.error(node, f"literal {node.value!r}: element functions take every constant from "
                                      "the scalars (a float literal would promote float32 math), only the "
                                      "integer 0 in comparisons")
            return str(node.value), _ATOM
        if isinstance(node, ast.BinOp):
            op = type(node.op)
            if op not in _BINOPS:
                raise src.error(node, f"operator {ast.unparse(node)!r} is not supported in element functions "
                                      "(only + - * /)")
            prec = _PREC[op]
            a, pa = self.expr(node.left)
            b, pb = self.expr(node.right)
            return f"{_wrap(a, pa, prec)} {_BINOPS[op]} {_wrap(b, pb, prec + 1)}", prec
        if isinstance(node, ast.UnaryOp):
            if isinstance(node.op, ast.USub):
                a, pa = self.expr(node.operand)
                return f"-{_wrap(a, pa, _UNARY)}", _UNARY
            if isinstance(node.op, ast.Not):
                a, pa = self.cond(node.operand)
                return f"!{_wrap(a, pa, _UNARY)}", _UNARY
            raise src.error(node, f"unary operator in {ast.unparse(node)!r} is not supported")
        if isinstance(node, (ast.Compare, ast.BoolOp)):
            return self.cond(node)
        if isinstance(node, ast.IfExp):
            c = self.test(node.test)
            a, _ = self.expr(node.body)
            b, _ = self.expr(node.orelse)
            return f"(({c}) ? ({a}) : ({b}))", _ATOM
        if isinstance(node, ast.Call):
            fn = ast.unparse(node.func)
            known = {"math.sqrt": ("SQRT", 1), "math.copysign": ("COPYSIGN", 2), "abs": ("FABS", 1)}
            if fn not in known or node.keywords:
                raise src.error(node, f"call {ast.unparse(node)!r}: element functions call only math.sqrt, "
                                      "math.copysign and abs")
            cname, arity = known[fn]
            if len(node.args) != arity:
                raise src.error(node, f"{fn} takes {arity} argument(s)")
            return f"{cname}({', '.join(self.expr(a)[0] for a in node.args)})", _ATOM
        raise src.error(node, f"{type(node).__name__} {ast.unparse(node)!r} is not supported in element "
                              "functions")

    def cond(self, node: ast.expr) -> tuple[str, int]:
        if isinstance(node, ast.Compare):
            parts = []
            left = node.left
            for op, right in zip(node.ops, node.comparators):
                if type(op) not in _CMPOPS:
                    raise self.src.error(node, f"comparison {ast.unparse(node)!r} is not supported")
                a, pa = self.expr(left)
                b, pb = self.expr(right)
                parts.append(f"{_wrap(a, pa, 5)} {_CMPOPS[type(op)]} {_wrap(b, pb, 5)}")
                left = right
            if len(parts) == 1:
                return parts[0], _PREC["cmp"]
            return "(" + " & ".join(f"({p})" for p in parts) + ")", _ATOM
        if isinstance(node, ast.BoolOp):
            # Per-element conditions combine with & and | (both sides are side-effect
            # free 0/1 values), never && and ||: a short circuit is control flow,
            # and GCC then leaves the loop scalar (measured: Lion on AVX2, 5-7x).
            joiner = " & " if isinstance(node.op, ast.And) else " | "
            return "(" + joiner.join(f"({self.cond(v)[0]})" for v in node.values) + ")", _ATOM
        return self.expr(node)

    def test(self, node: ast.expr) -> str:
        """A condition: a specialization flag when loop-invariant, else per-element C."""
        if _invariant(node, set(self.fields)):
            for sub in ast.walk(node):
                if isinstance(sub, ast.Attribute) and sub.attr not in self.fields:
                    raise self.src.error(sub, f"{sub.attr!r} is not a field of the scalars")
            return self.flag(node)
        return self.cond(node)[0]

    # statements
    def block(self, stmts: list[ast.stmt], depth: int, out: list[str], last: bool) -> Optional[ast.Return]:
        ret = None
        pad = "    " * depth
        for k, st in enumerate(stmts):
            if isinstance(st, ast.Expr) and isinstance(st.value, ast.Constant) and isinstance(st.value.value, str):
                continue  # docstring
            if isinstance(st, ast.Pass):
                continue
            if ret is not None:
                raise self.src.error(st, "statements after the return")
            if isinstance(st, ast.Assign):
                if len(st.targets) != 1 or not isinstance(st.targets[0], ast.Name):
                    raise self.src.error(st, "only single-name assignments (x = ...) are supported")
                name = st.targets[0].id
                value, _ = self.expr(st.value)
                if name not in self.params and name not in self.locals:
                    if name in C_RESERVED or name.startswith(("io_", "f_")):
                        raise self.src.error(st, f"the name {name!r} is reserved in the generated C")
                    self.locals.append(name)
                if name == self.params[-1]:
                    raise self.src.error(st, f"the scalars {name!r} are read-only")
                out.append(f"{pad}{name} = {value};")
            elif isinstance(st, ast.If):
                c = self.test(st.test)
                out.append(f"{pad}if ({c}) {{")
                self.block(st.body, depth + 1, out, False)
                orelse = st.orelse
                while len(orelse) == 1 and isinstance(orelse[0], ast.If):
                    c = self.test(orelse[0].test)
                    out.append(f"{pad}}} else if ({c}) {{")
                    self.block(orelse[0].body, depth + 1, out, False)
                    orelse = orelse[0].orelse
                if orelse:
                    out.append(f"{pad}}} else {{")
                    self.block(orelse, depth + 1, out, False)
                out.append(f"{pad}}}")
            elif isinstance(st, ast.Return):
                if not (last and depth == 1 and k == len(stmts) - 1):
                    raise self.src.error(st, "the return must be the function's last statement")
                ret = st
            else:
                raise self.src.error(st, f"{type(st).__name__} statements are not supported in element "
                                         "functions (only assignments, if/else and the final return)")
        return ret


def translate_element(fn: Callable, where: str, fields: dict[str, type], nstate: int,
                      flag_conditions: list[ast.expr] = ()) -> ElementC:
    """Translate one element function ``(p, g, *state, s) -> (p, *state)``.

    ``fields``: the scalars' fields and their types; ``flag_conditions``:
    conditions over ``s.<field>`` that must be flags even if the body does not
    test them (the state buffers' ``when``)."""
    src = source_of(fn, where)
    node = src.node
    args = node.args
    if args.vararg or args.kwarg or args.kwonlyargs or args.defaults or args.posonlyargs:
        raise src.error(node, "element functions take plain positional parameters: p, g, states..., s")
    params = [a.arg for a in args.args]
    if params and params[-1] != "s":
        raise src.error(node, f"the scalars parameter (the last) must be named s, got {params[-1]!r}")
    if len(params) != nstate + 3:
        raise src.error(node, f"expected {nstate + 3} parameters (p, g, {nstate} state(s), s), got {params}")
    for name in params[:-1]:
        if name in C_RESERVED or name.startswith(("io_", "f_")):
            raise src.error(node, f"the parameter name {name!r} is reserved in the generated C")
    tr = _ElementTranslator(src, fields, [])
    tr.params = params
    body: list[str] = []
    ret = tr.block(node.body, 1, body, True)
    for cond in flag_conditions:  # after the body's own flags, in the order they appear there
        tr.flag(cond)
    if ret is None:
        raise src.error(node, "no return statement: return p, state1, ... at the end")
    values = ret.value.elts if isinstance(ret.value, ast.Tuple) else [ret.value]
    if len(values) != nstate + 1:
        raise src.error(ret, f"the return must give {nstate + 1} values (p and {nstate} state(s)), "
                             f"got {len(values)}")
    returns = [tr.expr(v)[0] for v in values]
    return ElementC(node.name, params, tr.flags, tr.locals, body, returns)


def translate_invariant(cond: ast.expr, struct: str, fields: dict[str, type], where: str) -> str:
    """A loop-invariant condition over ``s.<field>`` as C over ``<struct>-><field>`` (or ``.``)."""
    def go(node: ast.expr) -> tuple[str, int]:
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "s":
            if node.attr not in fields:
                raise TranslationError(f"{where}: {node.attr!r} is not a field of the scalars")
            return f"{struct}{node.attr}", _ATOM
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return (str(node.value) if type(node.value) is int else repr(node.value)), _ATOM
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _CMPOPS:
            a, pa = go(node.left)
            b, pb = go(node.comparators[0])
            return f"{_wrap(a, pa, 5)} {_CMPOPS[type(node.ops[0])]} {_wrap(b, pb, 5)}", _PREC["cmp"]
        if isinstance(node, ast.BoolOp):
            prec = _PREC[type(node.op)]
            j = " && " if isinstance(node.op, ast.And) else " || "
            return j.join(_wrap(*go(v), prec + 2 if isinstance(v, ast.BoolOp) else prec + 1)
                          for v in node.values), prec
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            a, pa = go(node.operand)
            return f"!{_wrap(a, pa, _UNARY)}", _UNARY
        raise TranslationError(f"{where}: {ast.unparse(node)!r} is not supported in a condition over the scalars")
    return go(cond)[0]


def translate_when(text: str, struct: str, fields: dict[str, type], where: str) -> str:
    """A state buffer's ``when`` (over bare field names) as C over ``<struct><field>``."""
    return translate_invariant(when_as_invariant(text, where), struct, fields, where)


def when_as_invariant(text: str, where: str) -> ast.expr:
    """``"momentum != 0"`` -> the AST of ``s.momentum != 0`` (the element functions' spelling)."""
    tree = parse_expr(text, where)

    class Qualify(ast.NodeTransformer):
        def visit_Name(self, node):
            return ast.copy_location(ast.Attribute(value=ast.Name("s", ast.Load()), attr=node.id, ctx=ast.Load()),
                                     node)
    return ast.fix_missing_locations(Qualify().visit(tree))


# ---- compute functions and relations (double / int64_t / int) -----------------------

DOUBLE, INT64, BOOL = "double", "int64_t", "int"


@dataclass
class ComputeC:
    """A compute function in C: local declarations + the scalars' fields + the carried value."""
    lines: list[str]  # C statements (declarations of locals), indented by 4
    fields: dict[str, str]  # field -> C expression (already converted to the field's type)
    carried: Optional[str]  # the new carried value (C expression), or None


#: The calls of compute functions: Python's -> C's (double -> double; ``abs`` of an int is ``llabs``).
COMPUTE_CALLS = {"math.sqrt": "sqrt", "abs": "fabs", "math.log": "log", "math.exp": "exp"}
#: The calls of relations and trust ratios: no log or exp (a trust ratio also runs over
#: NumPy arrays, whose log and exp need not round as libm's do).
VALUE_CALLS = {"math.sqrt": "sqrt", "abs": "fabs"}


class _ScalarTranslator:
    """Expressions of compute functions: Python's numeric tower as C's types."""

    def __init__(self, src: Source, env: dict[str, tuple[str, str]], calls: Optional[dict[str, str]] = None):
        self.src = src
        self.env = dict(env)  # Python name -> (C text, type)
        self.calls = VALUE_CALLS if calls is None else calls  # Python function -> C function

    def expr(self, node: ast.expr) -> tuple[str, int, str]:
        """(C text, precedence, type)."""
        src = self.src
        if isinstance(node, ast.Name):
            if node.id not in self.env:
                raise src.error(node, f"{node.id!r} is not a parameter or an earlier assignment")
            text, kind = self.env[node.id]
            return text, (_ATOM if text.isidentifier() else _UNARY), kind
        if isinstance(node, ast.Constant):
            v = node.value
            if isinstance(v, bool):
                return ("1" if v else "0"), _ATOM, BOOL
            if isinstance(v, int):
                return str(v), _ATOM, INT64
            if isinstance(v, float):
                return _c_double(v, src, node), _ATOM, DOUBLE
            raise src.error(node, f"literal {v!r} is not a number")
        if isinstance(node, ast.BinOp):
            op = type(node.op)
            a, pa, ta = self.expr(node.left)
            b, pb, tb = self.expr(node.right)
            if BOOL in (ta, tb):
                raise src.error(node, f"{ast.unparse(node)!r}: arithmetic on a bool")
            if op is ast.Pow:
                # Python's float ** converts both operands to double and calls C's pow.
                if ta == INT64 and tb == INT64:
                    raise src.error(node, f"{ast.unparse(node)!r}: int ** int is an exact int in Python; "
                                          "make one operand a float")
                return f"pow({self.as_double(a, pa, ta, bare=True)}, {self.as_double(b, pb, tb, bare=True)})", \
                    _ATOM, DOUBLE
            if op not in _BINOPS:
                raise src.error(node, f"operator in {ast.unparse(node)!r} is not supported (+ - * / **)")
            prec = _PREC[op]
            if op is ast.Div or DOUBLE in (ta, tb):
                # Python converts an int operand to float at this operation (and / is always float).
                a = self.as_double(a, pa, ta) if ta != DOUBLE else _wrap(a, pa, prec)
                b = self.as_double(b, pb, tb) if tb != DOUBLE else _wrap(b, pb, prec + 1)
                return f"{a} {_BINOPS[op]} {b}", prec, DOUBLE
            # int op int stays exact in int64_t, as in Python; fo_add_i64/fo_sub_i64 (api.c)
            # saturate instead of overflowing (undefined in C) at steps near INT64_MAX.
            if op is ast.Mult:
                raise src.error(node, f"{ast.unparse(node)!r}: int * int is not supported (it can overflow "
                                      "int64_t; make one operand a float)")
            helper = "fo_add_i64" if op is ast.Add else "fo_sub_i64"
            return f"{helper}({a}, {b})", _ATOM, INT64
        if isinstance(node, ast.UnaryOp):
            if isinstance(node.op, ast.USub):
                a, pa, ta = self.expr(node.operand)
                if ta == BOOL:
                    raise src.error(node, f"{ast.unparse(node)!r}: negating a bool")
                return f"-{_wrap(a, pa, _UNARY)}", _UNARY, ta
            if isinstance(node.op, ast.Not):
                a, pa, _ = self.expr(node.operand)
                return f"!{_wrap(a, pa, _UNARY)}", _UNARY, BOOL
            raise src.error(node, f"unary operator in {ast.unparse(node)!r} is not supported")
        if isinstance(node, ast.Compare):
            parts = []
            left = node.left
            for op, right in zip(node.ops, node.comparators):
                if type(op) not in _CMPOPS:
                    raise src.error(node, f"comparison {ast.unparse(node)!r} is not supported")
                a, pa, ta = self.expr(left)
                b, pb, tb = self.expr(right)
                if DOUBLE in (ta, tb):
                    a = self.as_double(a, pa, ta) if ta != DOUBLE else _wrap(a, pa, 5)
                    b = self.as_double(b, pb, tb) if tb != DOUBLE else _wrap(b, pb, 5)
                else:
                    a, b = _wrap(a, pa, 5), _wrap(b, pb, 5)
                parts.append(f"{a} {_CMPOPS[type(op)]} {b}")
                left = right
            if len(parts) == 1:
                return parts[0], _PREC["cmp"], BOOL
            return " && ".join(parts), _PREC[ast.And], BOOL
        if isinstance(node, ast.BoolOp):
            prec = _PREC[type(node.op)]
            j = " && " if isinstance(node.op, ast.And) else " || "
            texts = []
            for v in node.values:
                t, pt, _ = self.expr(v)
                texts.append(_wrap(t, pt, prec + 2 if isinstance(v, ast.BoolOp) else prec + 1))
            return j.join(texts), prec, BOOL
        if isinstance(node, ast.IfExp):
            c, _, _ = self.expr(node.test)
            a, pa, ta = self.expr(node.body)
            b, pb, tb = self.expr(node.orelse)
            kind = ta
            if ta != tb:
                if BOOL in (ta, tb):
                    raise src.error(node, f"{ast.unparse(node)!r}: the two arms have different types")
                a, b, kind = self.as_double(a, pa, ta), self.as_double(b, pb, tb), DOUBLE
            return f"(({c}) ? ({a}) : ({b}))", _ATOM, kind
        if isinstance(node, ast.Call):
            fn = ast.unparse(node.func)
            if fn not in self.calls or node.keywords or len(node.args) != 1:
                raise src.error(node, f"call {ast.unparse(node)!r}: this function calls only "
                                      f"{', '.join(f'{name}(x)' for name in self.calls)}")
            a, pa, ta = self.expr(node.args[0])
            if ta == BOOL:
                raise src.error(node, f"{ast.unparse(node)!r} of a bool")
            if fn == "abs" and ta == INT64:
                return f"llabs({a})", _ATOM, INT64
            return f"{self.calls[fn]}({self.as_double(a, pa, ta, bare=True)})", _ATOM, DOUBLE
        raise src.error(node, f"{type(node).__name__} {ast.unparse(node)!r} is not supported in compute "
                              "functions")

    @staticmethod
    def as_double(text: str, prec: int, kind: str, bare: bool = False) -> str:
        if kind == DOUBLE:
            return text if bare or prec >= _UNARY else f"({text})"
        return f"(double){text}" if prec >= _ATOM else f"(double)({text})"

    def convert(self, text: str, prec: int, kind: str, want: str, node: ast.AST) -> str:
        if want == BOOL:
            return f"({text}) != 0" if prec < _ATOM else f"{text} != 0"
        if want == DOUBLE:
            return self.as_double(text, prec, kind, bare=True)
        if kind != INT64:
            raise self.src.error(node, f"an int64_t value cannot come from {kind}")
        return text


def _straight_line(src: Source, tr: _ScalarTranslator, params: list[str]) -> tuple[list[str], ast.Return]:
    """The C of a body of single-name assignments and one final return (declarations of
    new locals, assignments converted to the local's type), and the return statement."""
    lines: list[str] = []
    ret = None
    body = src.node.body
    for k, st in enumerate(body):
        if isinstance(st, ast.Expr) and isinstance(st.value, ast.Constant) and isinstance(st.value.value, str):
            continue
        if isinstance(st, ast.Assign):
            if len(st.targets) != 1 or not isinstance(st.targets[0], ast.Name):
                raise src.error(st, "only single-name assignments (x = ...) are supported")
            name = st.targets[0].id
            text, prec, kind = tr.expr(st.value)
            if name in tr.env:
                if name in params:
                    raise src.error(st, f"assigning to the parameter {name!r}")
                ctext, old = tr.env[name]
                lines.append(f"    {name} = {tr.convert(text, prec, kind, old, st)};")
            else:
                if name in C_RESERVED or name == "out":
                    raise src.error(st, f"the name {name!r} is reserved in the generated C")
                lines.append(f"    {kind} {name} = {text};")
                tr.env[name] = (name, kind)
        elif isinstance(st, ast.Return):
            if k != len(body) - 1:
                raise src.error(st, "the return must be the last statement")
            ret = st
        else:
            raise src.error(st, f"{type(st).__name__} statements are not supported in compute functions "
                                "(straight-line assignments and one return)")
    if ret is None or ret.value is None:
        raise src.error(src.node, "no return statement")
    return lines, ret


def translate_compute(fn: Callable, where: str, env: dict[str, tuple[str, str]], scalars: type,
                      field_types: dict[str, str], carry: Optional[str]) -> ComputeC:
    """Translate ``compute``: straight-line assignments and ``return Scalars(...)``
    (or ``return Scalars(...), new_carried``). ``env``: parameter -> (C text, type)."""
    src = source_of(fn, where)
    tr = _ScalarTranslator(src, env, COMPUTE_CALLS)
    params = [a.arg for a in src.node.args.args] + [a.arg for a in src.node.args.kwonlyargs]
    for p in params:
        if p not in env:
            raise src.error(src.node, f"parameter {p!r} is neither a flat hyperparameter, step nor a constant")
    lines, ret = _straight_line(src, tr, params)
    value = ret.value
    carried = None
    if carry is not None:
        if not (isinstance(value, ast.Tuple) and len(value.elts) == 2):
            raise src.error(ret, f"the rule carries {carry!r}: return (Scalars(...), new {carry})")
        value, new = value.elts
        text, prec, kind = tr.expr(new)
        carried = tr.convert(text, prec, kind, DOUBLE, new)
    if not (isinstance(value, ast.Call) and isinstance(value.func, ast.Name)
            and value.func.id == scalars.__name__):
        raise src.error(ret, f"the return value must be a call {scalars.__name__}(...)")
    given: dict[str, ast.expr] = {}
    for pos, arg in enumerate(value.args):
        given[scalars._fields[pos]] = arg
    for kw in value.keywords:
        if kw.arg is None or kw.arg not in scalars._fields:
            raise src.error(ret, f"{scalars.__name__} has no field {kw.arg!r}")
        given[kw.arg] = kw.value
    missing = [f for f in scalars._fields if f not in given]
    if missing:
        raise src.error(ret, f"{scalars.__name__}(...) misses {missing}")
    fields = {}
    for f in scalars._fields:
        text, prec, kind = tr.expr(given[f])
        fields[f] = tr.convert(text, prec, kind, field_types[f], given[f])
    return ComputeC(lines, fields, carried)


def translate_relation(fn: Callable, where: str, env: dict[str, tuple[str, str]]) -> str:
    """A relation predicate ``(some flat hyperparameters) -> bool``: one return."""
    src = source_of(fn, where)
    body = [st for st in src.node.body
            if not (isinstance(st, ast.Expr) and isinstance(st.value, ast.Constant))]
    if len(body) != 1 or not isinstance(body[0], ast.Return) or body[0].value is None:
        raise src.error(src.node, "a relation is one return of a condition")
    for a in src.node.args.args:
        if a.arg not in env:
            raise src.error(src.node, f"parameter {a.arg!r} is not a flat hyperparameter")
    tr = _ScalarTranslator(src, {a.arg: env[a.arg] for a in src.node.args.args})
    text, prec, kind = tr.expr(body[0].value)
    return text


def translate_value(fn: Callable, where: str, env: dict[str, tuple[str, str]]) -> tuple[list[str], str]:
    """A restricted function giving one double (a two-pass rule's trust ratio,
    ``fastopt.rule.Trust.ratio``): straight-line assignments and one ``return``.
    ``env``: parameter -> (C text, type). Returns (C statements, the value as double)."""
    src = source_of(fn, where)
    tr = _ScalarTranslator(src, env)
    params = [a.arg for a in src.node.args.args] + [a.arg for a in src.node.args.kwonlyargs]
    for p in params:
        if p not in env:
            raise src.error(src.node, f"parameter {p!r} is not one of the function's inputs ({', '.join(env)})")
    lines, ret = _straight_line(src, tr, params)
    text, prec, kind = tr.expr(ret.value)
    if kind == BOOL:
        raise src.error(ret, "the return value must be a number, not a bool")
    return lines, tr.convert(text, prec, kind, DOUBLE, ret)
