"""A small, safe evaluator of arithmetic expressions (for ComfyUI's ``ComfyMathExpression``).

Workflows come from anywhere, so the expression is untrusted text: it is parsed with Python's
``ast`` and only a whitelist of node kinds is evaluated — numbers, booleans, the given
variables, arithmetic, comparisons, ``and``/``or``/``not``, ``x if c else y`` and calls of
the functions in ``FUNCTIONS`` by name. No attribute access, subscripts, comprehensions,
lambdas, strings or names other than the variables and functions: ``eval`` is never used.
Sizes are bounded (text length, syntax-tree size, exponents, integer digits), so no
expression can take the process's memory or time.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Mapping
from typing import Any

MAX_LENGTH = 2000
MAX_NODES = 500
#: ComfyUI's cap on exponents (its evaluator refuses larger ones).
MAX_EXPONENT = 4000
#: Integers beyond this many bits are refused (a chain of products could grow them forever).
MAX_INT_BITS = 4096


class ExpressionError(ValueError):
    """The expression cannot be evaluated; the message says why and where."""


def _sum(*args: Any) -> Any:
    """``sum(values)`` and ``sum(a, b, c)`` both work, as in ComfyUI."""
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        return sum(args[0])
    return sum(args)


def _pow(base: Any, exp: Any) -> Any:
    _check_exponent(exp)
    return pow(base, exp)


def _numbers(fn: Callable[..., Any]) -> Callable[..., Any]:
    def checked(*args: Any) -> Any:
        for arg in args:
            if not isinstance(arg, (int, float, bool, list, tuple)):
                raise ExpressionError(f"{fn.__name__}() takes numbers")
        return fn(*args)
    checked.__name__ = fn.__name__
    return checked


#: The functions ComfyUI's math node offers, by the same names.
FUNCTIONS: dict[str, Callable[..., Any]] = {name: _numbers(fn) for name, fn in {
    "sum": _sum, "min": min, "max": max, "abs": abs, "round": round, "pow": _pow, "sqrt": math.sqrt,
    "ceil": math.ceil, "floor": math.floor, "log": math.log, "log2": math.log2, "log10": math.log10,
    "sin": math.sin, "cos": math.cos, "tan": math.tan, "int": int, "float": float,
}.items()}

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: None}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg, ast.Not: operator.not_}
_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
            ast.Gt: operator.gt, ast.GtE: operator.ge}


def evaluate(expression: str, names: Mapping[str, Any]) -> Any:
    """The value of ``expression`` with ``names`` as its variables."""
    if not isinstance(expression, str) or not expression.strip():
        raise ExpressionError("the expression is empty")
    if len(expression) > MAX_LENGTH:
        raise ExpressionError(f"the expression is longer than {MAX_LENGTH} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise ExpressionError(f"not a valid expression: {exc.msg} (column {exc.offset})") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise ExpressionError(f"the expression is too large (more than {MAX_NODES} parts)")
    try:
        return _Evaluator(names).visit(tree.body)
    except ExpressionError:
        raise
    except ZeroDivisionError:
        raise ExpressionError("division by zero") from None
    except (ValueError, TypeError, OverflowError, ArithmeticError) as exc:
        raise ExpressionError(f"{type(exc).__name__}: {exc}") from None


class _Evaluator:
    def __init__(self, names: Mapping[str, Any]) -> None:
        self.names = names

    def visit(self, node: ast.AST) -> Any:
        method = getattr(self, "visit_" + type(node).__name__, None)
        if method is None:
            raise ExpressionError(f"{_describe(node)} is not allowed in a math expression")
        return _bounded(method(node))

    def visit_Constant(self, node: ast.Constant) -> Any:
        if isinstance(node.value, (int, float)) and not isinstance(node.value, complex):
            return node.value
        raise ExpressionError(f"the constant {node.value!r} is not a number")

    def visit_Name(self, node: ast.Name) -> Any:
        if node.id in self.names:
            return self.names[node.id]
        if node.id in ("True", "False"):
            return node.id == "True"
        known = ", ".join(sorted(self.names)) or "none"
        raise ExpressionError(f"unknown name '{node.id}' (the variables are: {known})")

    def visit_List(self, node: ast.List) -> Any:
        return [self.visit(e) for e in node.elts]

    visit_Tuple = visit_List

    def visit_BinOp(self, node: ast.BinOp) -> Any:
        kind = type(node.op)
        if kind not in _BINARY:
            raise ExpressionError(f"the operator {type(node.op).__name__} is not allowed")
        left, right = self.visit(node.left), self.visit(node.right)
        if kind is ast.Pow:
            return _pow(left, right)
        if isinstance(left, list) or isinstance(right, list):
            raise ExpressionError("arithmetic on lists is not allowed")
        return _BINARY[kind](left, right)

    def visit_UnaryOp(self, node: ast.UnaryOp) -> Any:
        kind = type(node.op)
        if kind not in _UNARY:
            raise ExpressionError(f"the operator {kind.__name__} is not allowed")
        return _UNARY[kind](self.visit(node.operand))

    def visit_BoolOp(self, node: ast.BoolOp) -> Any:
        value = self.visit(node.values[0])
        for item in node.values[1:]:
            if (isinstance(node.op, ast.And) and not value) or (isinstance(node.op, ast.Or) and value):
                return value
            value = self.visit(item)
        return value

    def visit_Compare(self, node: ast.Compare) -> Any:
        left = self.visit(node.left)
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            if type(op) not in _COMPARE:
                raise ExpressionError(f"the comparison {type(op).__name__} is not allowed")
            right = self.visit(right_node)
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True

    def visit_IfExp(self, node: ast.IfExp) -> Any:
        return self.visit(node.body) if self.visit(node.test) else self.visit(node.orelse)

    def visit_Call(self, node: ast.Call) -> Any:
        if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
            names = ", ".join(sorted(FUNCTIONS))
            raise ExpressionError(f"only these functions can be called: {names}")
        if node.keywords:
            raise ExpressionError(f"{node.func.id}() takes no keyword arguments")
        return FUNCTIONS[node.func.id](*(self.visit(a) for a in node.args))


def _check_exponent(exp: Any) -> None:
    if isinstance(exp, (int, float)) and abs(exp) > MAX_EXPONENT:
        raise ExpressionError(f"the exponent {exp} exceeds the maximum of {MAX_EXPONENT}")


def _bounded(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_INT_BITS:
        raise ExpressionError(f"an integer in the expression grew beyond {MAX_INT_BITS} bits")
    return value


def _describe(node: ast.AST) -> str:
    return {"Attribute": "attribute access", "Subscript": "indexing", "Lambda": "lambda",
            "ListComp": "a comprehension", "GeneratorExp": "a comprehension", "DictComp": "a comprehension",
            "SetComp": "a comprehension", "Dict": "a dict", "Set": "a set", "JoinedStr": "an f-string",
            "NamedExpr": "assignment", "Starred": "unpacking", "Await": "await", "Yield": "yield"} \
        .get(type(node).__name__, type(node).__name__)
