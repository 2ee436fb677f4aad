"""The ``nodeflow`` command line.

    nodeflow run WORKFLOW.json [--set NODE_ID.INPUT=VALUE ...] [--output-dir DIR]
    nodeflow validate WORKFLOW.json
    nodeflow nodes [NAME] [--json]
    nodeflow serve [--listen HOST] [--port PORT]

Exit codes: 0 success, 1 the workflow is invalid or a node failed, 2 bad usage or an
unreadable file, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nodeflow import configure_devices
from nodeflow import folders as folders_mod
from nodeflow.executor import Executor
from nodeflow.graph import WorkflowError, is_link, parse, validate
from nodeflow.registry import Registry, default_registry

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
#: What a shell reports for a process stopped by SIGPIPE (128 + 13).
EXIT_BROKEN_PIPE = 141


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:  # argparse's REMAINDER drops leading options: hand them over as they are
        argv = ["serve", "--", *argv[1:]]
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    if args.command != "serve":  # the server configures its own logging
        _log_warnings_to_stderr()
    try:
        code = args.func(args)
        sys.stdout.flush()  # here, so that a closed pipe is noticed in this try
        return code
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except WorkflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`nodeflow nodes --json | head`): stop quietly, as Unix tools do.
        _discard_stdout()
        return EXIT_BROKEN_PIPE


def _log_warnings_to_stderr() -> None:
    """Show warnings from the engine and the nodes as ``warning: ...`` lines (once each),
    unless the embedding program has set up logging itself."""
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(_LevelFormatter("%(levelname)s: %(message)s"))
    root.addHandler(handler)


class _LevelFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        record = logging.makeLogRecord({**record.__dict__, "levelname": record.levelname.lower()})
        return super().format(record)


def _discard_stdout() -> None:
    # Python flushes stdout again at exit: point it at /dev/null so that does not fail too.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (captured output)
        pass


def speed_options(parser: argparse.ArgumentParser) -> None:
    """``--compile``, ``--compile-backend`` and ``--cuda-graphs`` (``nodeflow run`` and the server)."""
    parser.add_argument("--compile", action="store_true",
                        help="compile the UNet and the VAE decoder with torch.compile (channels-last; graphs cached "
                             "per size, batch and precision: a new prompt, seed, cfg or LoRA does not compile again)")
    parser.add_argument("--compile-backend", default="inductor", metavar="NAME",
                        help="the torch.compile backend for --compile (default inductor; aot_eager or eager to debug)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="replay UNet steps of fixed shapes as CUDA graphs (CUDA only; with or without --compile)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nodeflow", description="Run Stable Diffusion node graphs.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--base-dir", metavar="DIR",
                        help="folder holding models/, input/, output/, temp/ (default: $NODEFLOW_HOME or .)")

    r = sub.add_parser("run", help="run a workflow (API-format JSON, UI-format JSON, or a PNG that embeds one)")
    r.add_argument("workflow", type=Path)
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="NODE_ID.INPUT=VALUE",
                   help="override an input (VALUE is JSON, or a plain string; [\"NODE_ID\", INDEX] on a "
                        "link input rewires it); repeatable")
    r.add_argument("--output-dir", metavar="DIR", help="where SaveImage writes (default: BASE/output)")
    r.add_argument("--device", help="cuda, cuda:1, mps or cpu (default: the best available)")
    r.add_argument("--precision", choices=["fp32", "fp16", "bf16"], help="model precision (default: per device)")
    speed_options(r)
    r.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    r.add_argument("--json", action="store_true", help="print the outputs as JSON")
    common(r)
    r.set_defaults(func=cmd_run)

    v = sub.add_parser("validate", help="check a workflow without running it")
    v.add_argument("workflow", type=Path)
    v.add_argument("--set", dest="overrides", action="append", default=[], metavar="NODE_ID.INPUT=VALUE")
    common(v)
    v.set_defaults(func=cmd_validate)

    n = sub.add_parser("nodes", help="list node types, or show one's schema")
    n.add_argument("name", nargs="?")
    n.add_argument("--json", action="store_true", help="print ComfyUI /object_info JSON")
    common(n)
    n.set_defaults(func=cmd_nodes)

    d = sub.add_parser("demo", help="make a picture offline with nodeflow's own small demo model")
    d.add_argument("--prompt", default="a yellow triangle on a black background",
                   help="what to draw: a red/green/blue/yellow/purple circle or triangle on a "
                        "white/black/gray/pink/cyan background")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--steps", type=int, default=20)
    d.add_argument("--cfg", type=float, default=5.0)
    d.add_argument("--batch", type=int, default=4, help="how many pictures")
    d.add_argument("--train", action="store_true",
                   help="train the demo model from scratch (a few minutes on a CPU) instead of using the shipped one")
    d.add_argument("--quiet", "-q", action="store_true")
    d.add_argument("--json", action="store_true")
    d.add_argument("--output-dir", metavar="DIR")
    common(d)
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("serve", help="start the HTTP + WebSocket server (ComfyUI's API)")
    s.add_argument("rest", nargs=argparse.REMAINDER, help="server options, see `nodeflow serve --help`")
    s.set_defaults(func=cmd_serve)
    return p


# -- commands -------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    folders = folders_mod.configure(_dir(args.base_dir), output_dir=_dir(args.output_dir))
    _configure_devices(args.device, args.precision, args.compile_backend if args.compile else None, args.cuda_graphs)
    from nodeflow.workflow_files import editor_workflow

    ui = editor_workflow(args.workflow)
    extra = {"extra_pnginfo": {"workflow": ui}} if ui is not None else None
    registry = _registry()
    return _run_prompt(_load(args.workflow, args.overrides, registry), args.workflow, folders, args, extra, registry)


def cmd_demo(args: argparse.Namespace) -> int:
    """Make sure the demo checkpoint exists, then run workflows/txt2img_demo.json on it."""
    from nodeflow.train import assets

    folders = folders_mod.configure(_dir(args.base_dir), output_dir=_dir(args.output_dir))
    target = folders.model_dirs("checkpoints")[0] / assets.DEMO_CHECKPOINT
    if args.train or not target.is_file():
        if args.train or not assets.install_shipped(target):
            print(f"training the demo model into {target} (a few minutes on the CPU) ...", file=sys.stderr)
            from nodeflow.train.demo import train

            train(target, log=(lambda m: None) if args.quiet else None)
        elif not args.quiet:
            print(f"installed the demo model at {target}", file=sys.stderr)
    _install_example_inputs(folders, args.quiet)
    workflow = _find_workflow(DEMO_WORKFLOW)
    overrides = [f"5.batch_size={args.batch}", f"6.text={json.dumps(args.prompt)}", f"3.seed={args.seed}",
                 f"3.steps={args.steps}", f"3.cfg={args.cfg}"]
    args.overrides = overrides
    registry = _registry()
    code = _run_prompt(_load(workflow, overrides, registry), workflow, folders, args, registry=registry)
    if code == EXIT_OK and not args.quiet and not args.json:
        print("next: `python server.py` (or `nodeflow serve`) and open http://127.0.0.1:8188, the graph editor; "
              "its template \"txt2img on the demo model\" runs this workflow", file=sys.stderr)
    return code


EXAMPLE_INPUTS = ("example.png", "example_masked.png")
#: The example workflows shipped inside the package (a ``workflows`` link at the top of a
#: source checkout points here).
WORKFLOWS = Path(__file__).resolve().parent / "workflows"
DEMO_WORKFLOW = "txt2img_demo.json"


def _install_example_inputs(folders, quiet: bool = False) -> None:
    """Copy the example workflows' input pictures (workflows/inputs/) into input/ where they
    are missing, so that img2img.json, inpaint.json, … run as the README shows."""
    try:
        source = _find_workflow("inputs")
    except CliError:
        return
    for name in EXAMPLE_INPUTS:
        target = folders.input / name
        if (source / name).is_file() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / name, target)
            if not quiet:
                print(f"copied {name} into {folders.input}", file=sys.stderr)


def _find_workflow(name: str) -> Path:
    """One of the example workflows nodeflow ships (``nodeflow/workflows/``)."""
    path = WORKFLOWS / name
    if not path.exists():
        raise CliError(f"nodeflow's workflows folder ({WORKFLOWS}) has no {name}: a broken install?")
    return path


def _run_prompt(prompt: dict[str, Any], source, folders, args: argparse.Namespace,
                extra_data: dict | None = None, registry: Registry | None = None) -> int:
    registry = registry or _registry()
    executor = Executor(registry)
    graph = parse(prompt)
    report = validate(graph, registry)
    if not report.ok:
        _print_errors(report, source)
        return EXIT_FAILED
    if report.errors:
        print(f"warning: running the valid outputs only; {len(report.errors)} problem(s):", file=sys.stderr)
        for err in report.errors:
            print(f"  {err}", file=sys.stderr)

    progress = _Progress(graph, enabled=not args.quiet)
    box: dict[str, Any] = {}
    done = threading.Event()
    prompt_id = str(uuid.uuid4())

    def work() -> None:
        try:
            box["result"] = executor.execute(graph, report, prompt_id=prompt_id, observer=progress,
                                             extra_data=extra_data)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            box["exc"] = exc
        finally:
            done.set()

    # The run goes on in a thread so that Ctrl-C (delivered to the main thread) can ask it
    # to stop between steps, leaving the cache consistent.
    worker = threading.Thread(target=work, name="nodeflow-run", daemon=True)
    _run_and_wait(worker, done, executor, prompt_id, progress)
    worker.join()
    progress.close()
    if "exc" in box:
        raise box["exc"]
    result = box["result"]

    if args.json:
        print(json.dumps({"prompt_id": result.prompt_id, "status": result.status, "outputs": result.ui,
                          "error": result.error}, indent=2, default=str))
    if result.status == "interrupted":
        stopped = result.messages[-1][1] if result.messages else {}
        where = f" in node {stopped['node_id']} ({stopped['node_type']})" if stopped.get("node_id") else ""
        print(f"interrupted{where}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if result.status == "error":
        err = result.error
        print(f"error: node {err['node_id']} ({err['node_type']}) failed: {err['exception_message']}", file=sys.stderr)
        return EXIT_FAILED
    if not args.json and not args.quiet:
        files = list(_saved_files(result.ui, folders))
        ran, cached = len(result.executed), len(result.cached)
        print(f"done: {ran} node(s) ran, {cached} cached", file=sys.stderr)
        for f in files:
            print(f)
    return EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    folders_mod.configure(_dir(args.base_dir))
    registry = _registry()
    prompt = _load(args.workflow, args.overrides, registry)
    graph = parse(prompt)
    report = validate(graph, registry)
    if report.errors:
        _print_errors(report, args.workflow)
        return EXIT_FAILED
    print(f"{args.workflow}: valid ({len(graph)} nodes, outputs: {', '.join(report.outputs)})")
    return EXIT_OK


def cmd_nodes(args: argparse.Namespace) -> int:
    folders_mod.configure(_dir(args.base_dir))
    registry = _registry()
    if args.name:
        info = registry.object_info(args.name)
        if not info:
            hint = registry.suggest(args.name)
            raise CliError(f"unknown node type {args.name!r}" + (f"; did you mean {', '.join(hint)}?" if hint else ""),
                           EXIT_FAILED)
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            print(_describe_node(next(iter(info.values()))))
        return EXIT_OK
    if args.json:
        print(json.dumps(registry.object_info(), indent=2))
        return EXIT_OK
    by_category: dict[str, list[str]] = {}
    for cls in registry.classes():
        aliases = f"  (also: {', '.join(cls.aliases)})" if cls.aliases else ""
        by_category.setdefault(cls.category or "other", []).append(f"  {cls.type_name}{aliases}")
    for category in sorted(by_category):
        print(f"{category}:")
        print("\n".join(by_category[category]))
    # Node packages that failed to load were reported as warnings while loading.
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from nodeflow.server.serve_cli import main as serve_main
    except ImportError as exc:
        raise CliError(f"the server is not available: {exc}") from None
    return serve_main(args.rest[1:] if args.rest[:1] == ["--"] else args.rest)


# -- helpers ----------------------------------------------------------------------------------


def _registry() -> Registry:
    return default_registry()


def _configure_devices(device: str | None, precision: str | None, compile: str | None = None,
                       cuda_graphs: bool = False) -> None:
    try:
        configure_devices(device, precision, compile=compile, cuda_graphs=cuda_graphs)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _dir(arg: str | None) -> str | None:
    """A folder given on the command line, made absolute against the current directory
    (as a user expects), not against the base directory."""
    return str(Path(arg).expanduser().resolve()) if arg else arg


def _run_and_wait(worker: threading.Thread, done: threading.Event, executor: Executor, prompt_id: str,
                  progress: _Progress) -> None:
    """Start the run's thread and wait for it. The first Ctrl-C asks the run to stop at its
    next step and waits for that; a second one quits at once.

    Ctrl-C is taken by a signal handler rather than as a KeyboardInterrupt: an exception
    can land anywhere (even before the wait starts), a handler only sets what to do."""
    presses = [0]

    def on_sigint(signum, frame) -> None:
        presses[0] += 1
        if presses[0] == 1:
            progress.close()
            print("\ninterrupting: stopping at the next step (Ctrl-C again to quit now)", file=sys.stderr)
            executor.interrupt(prompt_id)
            return
        # A node that never checks for interruption: leave without waiting for it. The
        # process ends here, so its cache does too; nothing half-done was saved.
        print("interrupted", file=sys.stderr)
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_sigint) if in_main else None
    try:
        worker.start()
        while not done.wait(0.1):
            if presses[0]:
                executor.interrupt(prompt_id)  # again: the run may not have been listening yet
    finally:
        if in_main:
            signal.signal(signal.SIGINT, previous)


def _load(path: Path, overrides: list[str], registry: Registry | None = None) -> dict[str, Any]:
    from nodeflow import load_workflow
    from nodeflow.graph import unwrap

    prompt = unwrap(load_workflow(path, registry))
    for item in overrides:
        apply_override(prompt, item, registry)
    return prompt


def apply_override(prompt: dict[str, Any], item: str, registry: Registry | None = None) -> None:
    """Apply one ``NODE_ID.INPUT=VALUE`` override (VALUE parsed as JSON, else a string).

    A list VALUE is a literal (wrapped as ``{"__value__": [...]}``), except that a link's
    shape ``["NODE_ID", INDEX]`` on an input that takes a link (a socket, a ``force_input``
    widget, or any input of a node type ``registry`` does not know) rewires that input."""
    target, sep, raw = item.partition("=")
    node_id, dot, name = target.partition(".")
    if not sep or not dot or not node_id or not name:
        raise CliError(f"--set {item!r}: expected NODE_ID.INPUT=VALUE, e.g. --set 3.seed=42")
    node = prompt.get(node_id)
    if not isinstance(node, dict):
        ids = ", ".join(k for k in prompt if not k.startswith("_"))
        raise CliError(f"--set {item!r}: the workflow has no node {node_id!r} (nodes: {ids})")
    inputs = node.setdefault("inputs", {})
    if not isinstance(inputs, dict):
        raise CliError(f"--set {item!r}: node {node_id}'s 'inputs' is a {type(inputs).__name__}, not an object "
                       "of inputs: the workflow is invalid", EXIT_FAILED)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    except (ValueError, RecursionError) as exc:  # a number too long, or nesting too deep
        raise CliError(f"--set {item!r}: VALUE is not usable: {exc or type(exc).__name__}") from None
    if isinstance(value, list) and not (is_link(value) and _takes_link(registry, node.get("class_type"), name)):
        value = {"__value__": value}
    inputs[name] = value


def _takes_link(registry: Registry | None, class_type: Any, name: str) -> bool:
    cls = registry.get(class_type) if registry is not None and isinstance(class_type, str) else None
    if cls is None:
        return True  # as the API format reads it
    spec = cls.all_inputs().get(name)
    # A widget shown as a socket in the editor (force_input) is meant to be linked too.
    return spec is None or not spec[0].is_widget or bool(getattr(spec[0], "force_input", False))


def _print_errors(report, source) -> None:
    n = len(report.errors)
    print(f"{source}: {n} problem{'s' if n != 1 else ''}:", file=sys.stderr)
    for err in report.errors:
        print(f"  - {err}", file=sys.stderr)


def _saved_files(ui: dict[str, dict], folders: folders_mod.Folders):
    for node_out in ui.values():
        for key in ("images", "gifs", "files"):
            for item in node_out.get(key, []) or []:
                if isinstance(item, dict) and "filename" in item:
                    kind = item.get("type", "output")
                    try:
                        yield str(folders.io_path(kind, item["filename"], item.get("subfolder", "")))
                    except ValueError:
                        continue


def _describe_node(info: dict) -> str:
    lines = [f"{info['name']}  [{info['category']}]" + ("  (output node)" if info["output_node"] else "")]
    if info["description"]:
        lines.append(f"  {info['description']}")
    for group in ("required", "optional"):
        for name, spec in info["input"][group].items():
            kind = spec[0] if isinstance(spec[0], str) else "COMBO"
            opts = spec[1] if len(spec) > 1 else {}
            extra = ""
            if isinstance(spec[0], list):
                shown = spec[0][:8]
                extra = f" one of {shown}" + (" ..." if len(spec[0]) > 8 else "")
            details = ", ".join(f"{k}={v}" for k, v in opts.items() if k in ("default", "min", "max"))
            lines.append(f"  in  {name}: {kind}{extra}{' (' + details + ')' if details else ''}"
                         f"{'' if group == 'required' else '  [optional]'}")
    for kind, name in zip(info["output"], info["output_name"]):
        lines.append(f"  out {name}: {kind}")
    return "\n".join(lines)


class _Progress:
    """Prints node progress to stderr: a bar on a terminal, plain lines otherwise."""

    def __init__(self, graph, enabled: bool = True) -> None:
        self.graph, self.enabled = graph, enabled
        self.tty = sys.stderr.isatty()
        self.node: str | None = None
        self.started = time.monotonic()
        self.line_open = False

    def __call__(self, event: str, data: dict) -> None:
        if not self.enabled:
            return
        if event == "executing" and data.get("node"):
            self._end_line()
            self.node = data["node"]
            self.started = time.monotonic()
        elif event == "progress":
            self._bar(data["value"], data["max"])

    def _label(self) -> str:
        entry = self.graph.nodes.get(self.node)
        return f"{self.node} ({entry.class_type})" if entry else str(self.node)

    def _bar(self, value: int, total: int) -> None:
        total = max(total, 1)
        elapsed = time.monotonic() - self.started
        rate = f"{value / elapsed:.2f} it/s" if elapsed > 0 and value else ""
        if self.tty:
            width = 30
            filled = int(width * value / total)
            sys.stderr.write(f"\r{self._label()} [{'#' * filled}{'.' * (width - filled)}] {value}/{total} {rate}  ")
            sys.stderr.flush()
            self.line_open = True
        elif value == total:
            print(f"{self._label()}: {value}/{total} {rate}", file=sys.stderr)

    def _end_line(self) -> None:
        if self.line_open:
            sys.stderr.write("\n")
            self.line_open = False

    def close(self) -> None:
        if self.enabled:
            self._end_line()


if __name__ == "__main__":
    sys.exit(main())
