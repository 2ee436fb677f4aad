"""Every ComfyUI class name nodeflow serves offers exactly ComfyUI's inputs in ``/object_info``:
the same names in the same order and sections, the same types, the defaults and limits
ComfyUI declares, and the same choices where ComfyUI's are fixed. Editor files store widget
values by position, so one extra, missing or reordered widget shifts every value after it.

The expectations are data recorded from ComfyUI's source (``data/comfyui_schemas.json``,
which names the commits read), independent of nodeflow's code: the schemas, and ComfyUI's
class names, so that every name nodeflow answers to (a native type name or an alias) that is
a ComfyUI class name must have its schema recorded and compared."""

import json
from pathlib import Path

import pytest

from nodeflow.registry import default_registry

DATA = json.loads((Path(__file__).parent / "data" / "comfyui_schemas.json").read_text())
CLASSES = DATA["classes"]
NAMES = DATA["comfyui_class_names"]
#: Every ComfyUI class name recorded: the complete list at one commit and the later file versions read.
COMFYUI_NAMES = ({n for names in NAMES["complete"]["files"].values() for n in names}
                 | {n for later in NAMES["later"] for n in later["names"]})
OPTION_KEYS = ("default", "min", "max", "step")


def normalise_ours(entry: list) -> tuple:
    """(type, declared options, fixed choices or None) of one /object_info input."""
    kind, opts = entry[0], (entry[1] if len(entry) > 1 else {})
    if isinstance(kind, list):
        return "COMBO", kind, {k: opts[k] for k in OPTION_KEYS if k in opts}
    if kind == "COMBO" and "options" in opts:
        return "COMBO", list(opts["options"]), {k: opts[k] for k in OPTION_KEYS if k in opts}
    return kind, None, opts


def test_the_class_name_list_is_whole():
    """nodes.py and every comfy_extras module ComfyUI loads, each file with its names, none twice."""
    files = NAMES["complete"]["files"]
    assert "nodes.py" in files and len(files) == 1 + 75  # the 75 comfy_extras modules at that commit
    assert all(path == "nodes.py" or path.startswith("comfy_extras/nodes_") for path in files)
    assert all(names for names in files.values()), "a file with no class names"
    every = [n for names in files.values() for n in names]
    assert len(every) == len(set(every)), "a class name in two files"
    assert all(len(later["commit"]) == 40 and later["names"] for later in NAMES["later"])


def test_every_comfyui_name_nodeflow_serves_is_recorded():
    """Native type names and aliases alike: a class registered under a ComfyUI name is held to
    ComfyUI's schema just as an alias is."""
    reg = default_registry()
    served = set(reg.names(include_aliases=True))
    missing = sorted((served & COMFYUI_NAMES) - set(CLASSES))
    assert not missing, f"ComfyUI class names nodeflow serves with no recorded schema: {missing}"
    not_comfyui = sorted(set(CLASSES) - COMFYUI_NAMES)
    assert not not_comfyui, f"recorded schemas of names that are not ComfyUI class names: {not_comfyui}"
    unknown = sorted(n for n in CLASSES if n not in reg)
    assert not unknown, f"recorded ComfyUI classes nodeflow does not serve: {unknown}"


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_object_info_matches_comfyui(name):
    info = default_registry().object_info(name)[name]
    want = CLASSES[name]
    autogrow = want.get("autogrow")
    for section in ("required",) if autogrow else ("required", "optional"):
        expected = want.get(section, [])
        got = info["input"][section]
        assert list(got) == [e[0] for e in expected], f"{name}: {section} inputs (names and order)"
        assert info["input_order"][section] == [e[0] for e in expected]
        for input_name, kind, options in expected:
            our_kind, our_choices, our_opts = normalise_ours(got[input_name])
            where = f"{name}.{input_name}"
            if isinstance(kind, list):
                assert (our_kind, our_choices) == ("COMBO", kind), f"{where}: choices"
            elif kind == "COMBO":
                assert our_kind == "COMBO", f"{where}: a COMBO"
            else:
                assert our_kind == kind, f"{where}: type"
            for key, value in options.items():
                ours = our_opts.get(key)
                # JSON numbers: 0 and 0.0 are the same to a client; a boolean is not a number.
                assert ours == value and isinstance(ours, bool) == isinstance(value, bool), \
                    f"{where}: {key} is {ours!r}, ComfyUI's is {value!r}"
    assert sorted(info["input"]["hidden"]) == sorted(want.get("hidden", [])), f"{name}: hidden inputs"
    for combo, options in want.get("dynamic_options", {}).items():
        ours = {o["key"]: o["inputs"]["required"] for o in info["input"]["required"][combo][1]["options"]}
        assert list(ours) == list(options), f"{name}.{combo}: options (names and order)"
        for key, expected in options.items():
            assert list(ours[key]) == [e[0] for e in expected], f"{name}.{combo}[{key}]: inputs"
            for input_name, kind, opts in expected:
                our_kind, our_choices, our_opts = normalise_ours(ours[key][input_name])
                assert (our_choices if isinstance(kind, list) else our_kind) == kind, f"{name}.{combo}.{input_name}"
                assert all(our_opts.get(k) == v for k, v in opts.items()), f"{name}.{combo}.{input_name}: options"
    if autogrow:
        names = [autogrow["prefix"] + c for c in autogrow["names"]]
        assert list(info["input"]["optional"]) == names
        assert {v[0] for v in info["input"]["optional"].values()} == {autogrow["type"]}
