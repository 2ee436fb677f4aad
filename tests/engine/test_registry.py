"""Node discovery: modules, packages that re-export their nodes, inherited run methods,
abstract bases, and entry points (through a dist-info folder on sys.path)."""

import sys
import textwrap
import uuid

import pytest

from nodeflow import Registry
from nodeflow.registry import node_classes

MATH = '''
    from nodeflow import Int, Node, Output


    class MathNode(Node):
        """A base class: its subclasses inherit run(); it is not a node type itself."""
        abstract = True
        category = "math"
        inputs = {"x": Int(default=0)}
        outputs = [Output("INT")]

        def run(self, x):
            return (self.apply(x),)


    class Unary(Node):
        """Not marked, but declares no inputs or outputs: a mixin, not a node."""

        def run(self, **kw):
            return ()


    class Double(MathNode):
        def apply(self, x):
            return 2 * x


    class Triple(MathNode):
        def apply(self, x):
            return 3 * x
'''


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A node package whose __init__ only re-exports its nodes (a common layout)."""
    name = f"nfpkg_{uuid.uuid4().hex[:8]}"
    root = tmp_path / name
    root.mkdir()
    (root / "math.py").write_text(textwrap.dedent(MATH))
    (root / "__init__.py").write_text(f"from {name}.math import Double, Triple\nfrom nodeflow import Node, Int\n"
                                      "Twice = Double  # an alias must not register it twice\n")
    (root / "empty.py").write_text("from nodeflow import Node\nVALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[mod]


def test_a_package_that_re_exports_its_nodes_registers_them(package):
    import importlib

    module = importlib.import_module(package)
    assert [c.__name__ for c in node_classes(module)] == ["Double", "Triple"]
    registry = Registry()
    assert registry.register_module(module) == 2
    assert registry.names() == ["Double", "Triple"]
    assert registry.get("Double")().run(x=4) == (8,)  # run() inherited from the base


def test_abstract_bases_and_other_packages_classes_are_left_out(package):
    import importlib

    math = importlib.import_module(f"{package}.math")
    assert [c.__name__ for c in node_classes(math)] == ["Double", "Triple"]
    # A module of another package that imports these nodes does not register them.
    other = type(sys)("someone_else")
    other.Double = math.Double
    assert node_classes(other) == []


def write_entry_points(tmp_path, entries: dict[str, str]) -> None:
    dist = tmp_path / f"fakenodes_{uuid.uuid4().hex[:8]}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist.name.split('-')[0]}\nVersion: 0.1\n")
    lines = "\n".join(f"{k} = {v}" for k, v in entries.items())
    (dist / "entry_points.txt").write_text(f"[nodeflow.nodes]\n{lines}\n")


def test_entry_points_register_packages_and_report_empty_or_broken_ones(package, tmp_path):
    write_entry_points(tmp_path, {"good": package, "empty": f"{package}.empty",
                                  "broken": "no_such_module_nodeflow_test"})
    registry = Registry()
    registry.load_entry_points()
    assert {"Double", "Triple"} <= set(registry.names())
    assert "has no node classes" in registry.load_errors["entry point empty"]
    assert "ModuleNotFoundError" in registry.load_errors["entry point broken"]
    assert "entry point good" not in registry.load_errors


def test_object_info_names_aliases_as_comfyui_and_leaves_editor_only_nodes_out():
    from nodeflow import Node, Output, String

    class LoadThing(Node):
        """A loader known under ComfyUI's name too."""
        aliases = ("ThingLoaderSimple", "ThingLoaderOld")
        alias_display_names = {"ThingLoaderSimple": "Load Thing"}
        inputs = {"name": String(default="a")}
        hidden = {}
        outputs = [Output("THING")]

        def run(self, name):
            return (name,)

    class Memo(Node):
        """An editor note: accepted in workflows, not offered to a frontend."""
        editor_only = True
        optional = {"text": String(default="")}

        def run(self, text=""):
            return ()

    reg = Registry([LoadThing, Memo])
    info = reg.object_info()
    assert info["LoadThing"]["display_name"] == LoadThing.display_name
    assert info["ThingLoaderSimple"]["display_name"] == "Load Thing"
    assert info["ThingLoaderOld"]["display_name"] == "ThingLoaderOld"
    assert info["ThingLoaderSimple"]["input_order"] == {"required": ["name"], "optional": [], "hidden": []}
    assert "Memo" not in info and reg.object_info("Memo") == {}
    assert reg.get("Memo") is Memo                        # still known to workflows and the converter


def test_node_classes_are_checked_when_defined():
    from nodeflow import Int, Node, Output
    from nodeflow.node import NodeDeclarationError

    with pytest.raises(NodeDeclarationError, match="no parameter for its input 'b'"):
        class MissesAnInput(Node):
            inputs = {"a": Int(), "b": Int()}
            outputs = [Output("INT")]

            def run(self, a):
                return (a,)

    with pytest.raises(NodeDeclarationError, match="'flag' needs a default"):
        class OptionalWithoutDefault(Node):
            inputs = {"a": Int()}
            optional = {"flag": Int()}

            def run(self, a, flag):
                return ()

    with pytest.raises(NodeDeclarationError, match="'extra' is not a declared input"):
        class TakesTooMuch(Node):
            inputs = {"a": Int()}

            def run(self, a, extra):
                return ()

    with pytest.raises(NodeDeclarationError, match="model_inputs names 'ckpt'"):
        class WrongModelInput(Node):
            inputs = {"ckpt_name": Int()}
            model_inputs = {"ckpt": "checkpoints"}

            def run(self, ckpt_name):
                return ()

    class Flexible(Node):  # **kwargs takes anything; defaults make extra parameters harmless
        inputs = {"a": Int(), "b": Int()}
        optional = {"c": Int()}

        def run(self, a, scale=1, **rest):
            return ()

    assert Flexible.type_name == "Flexible"


def test_a_comfyui_name_can_have_its_own_schema():
    """A native node whose inputs differ from ComfyUI's gives the ComfyUI name its own class:
    that class wins over the alias in lookups, in /object_info and in cache keys."""
    from nodeflow import Executor, Int, Node, Output

    class Native(Node):
        aliases = ("ComfyName",)
        inputs = {"x": Int(default=1), "extra": Int(default=0)}
        outputs = [Output("INT")]

        def run(self, x, extra):
            return (x + extra,)

    class ComfyName(Native):
        inputs = {"x": Int(default=1)}

        def run(self, x):
            return (x * 10,)

    class Show(Node):
        inputs = {"v": Int()}
        outputs = []
        output_node = True

        def run(self, v):
            from nodeflow import Result
            return Result(ui={"v": [v]})

    reg = Registry([Native, ComfyName, Show])
    assert reg.get("ComfyName") is ComfyName and reg.get("Native") is Native
    info = reg.object_info()
    assert list(info["ComfyName"]["input"]["required"]) == ["x"]
    assert list(info["Native"]["input"]["required"]) == ["x", "extra"]
    assert reg.names().count("ComfyName") == 1
    ex = Executor(reg)
    wf = {"1": {"class_type": "ComfyName", "inputs": {"x": 2}}, "2": {"class_type": "Show", "inputs": {"v": ["1", 0]}},
          "3": {"class_type": "Native", "inputs": {"x": 2, "extra": 0}},
          "4": {"class_type": "Show", "inputs": {"v": ["3", 0]}}}
    result = ex.run(wf)
    assert result.ui["2"] == {"v": [20]} and result.ui["4"] == {"v": [2]}
