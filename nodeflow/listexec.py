"""List execution: how a node runs over lists of values (ComfyUI's ``OUTPUT_IS_LIST`` and
``INPUT_IS_LIST``).

An output holds one value, or an ``OutputList`` of several: the output of a node that
declares it a list (``Output(..., is_list=True)``), or any output of a node that ran more
than once. A node fed an ``OutputList`` runs once per element, unless it takes whole lists
(``Node.input_is_list``):

- call *i* takes element *i* of each list input; a shorter list repeats its last element
  (ComfyUI's rule), and a single value is the same in every call;
- a list with no element makes no call at all (ComfyUI fails on an index error there): the
  node's outputs are then empty lists, and so on downstream;
- the calls' outputs are collected: a list output is the concatenation of what each call
  returned, any other output the list of each call's value (a plain value when the node ran
  once, even when it was fed a list of one), so the node's downstream runs once per element
  in turn.

A node that takes whole lists runs once and gets every input as a Python list (a single
value as a one-element list); it usually declares list outputs, or returns one value.

This module is pure Python: the executor uses it, nodes never see an ``OutputList`` (they
get its elements, or a plain list).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any


class OutputList(list):
    """The value of an output that holds several values (see the module docs). A ``list``
    subclass, so a workflow's caller reading ``ExecutionResult.output`` sees a list; the
    engine tells it from a value that happens to be a list (CONDITIONING is one) by its type."""

    __slots__ = ()


def is_output_list(value: Any) -> bool:
    return type(value) is OutputList


def call_inputs(inputs: Mapping[str, Any], takes_lists: bool) -> list[dict[str, Any]]:
    """The inputs of each call a node makes: one call with whole lists when it ``takes_lists``,
    else one call per element of its longest list input (none when a list input is empty)."""
    if takes_lists:
        return [{name: list(v) if is_output_list(v) else [v] for name, v in inputs.items()}]
    lengths = [len(v) for v in inputs.values() if is_output_list(v)]
    if not lengths:
        return [dict(inputs)]
    if min(lengths) == 0:
        return []
    return [{name: (v[i] if i < len(v) else v[-1]) if is_output_list(v) else v for name, v in inputs.items()}
            for i in range(max(lengths))]


def collect(results: Sequence[tuple], list_outputs: Sequence[bool]) -> tuple:
    """One node's outputs from the values each of its calls returned."""
    if len(results) == 1 and not any(list_outputs):
        return results[0]
    merged = []
    for index, is_list in enumerate(list_outputs):
        if is_list:
            merged.append(OutputList(v for values in results for v in values[index]))
        elif len(results) == 1:
            merged.append(results[0][index])
        else:
            merged.append(OutputList(values[index] for values in results))
    return tuple(merged)


def collect_ui(uis: Iterable[dict | None]) -> dict | None:
    """What several calls showed, as one ``ui``: each key's entries, call after call."""
    shown = [ui for ui in uis if ui is not None]
    if len(shown) <= 1:
        return shown[0] if shown else None
    merged: dict[str, list] = {}
    for ui in shown:
        for key, entries in ui.items():
            merged.setdefault(key, []).extend(entries if isinstance(entries, (list, tuple)) else [entries])
    return merged
