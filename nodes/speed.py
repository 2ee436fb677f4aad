"""Speed: the compiled model path and DeepCache, opt-in per workflow.

``CompileModel`` (ComfyUI's ``TorchCompileModel``) returns a MODEL whose UNet runs through
``torch.compile`` in channels-last format, its graphs cached per size, batch and precision, so
that a new prompt, seed, cfg, step count or LoRA never compiles again
(``nodeflow.models.compiled``); ``CompileVAE`` does the same for a VAE's decoder. ``--compile``
and ``--cuda-graphs`` give every model of a worker the same path without a node.

``DeepCache`` trades a little quality for speed: the UNet's deep features are computed every
``cache_interval`` steps and reused in between (``nodeflow.models.step_cache``).
"""

from __future__ import annotations

import copy

from nodeflow import Combo, Int, Node, Output, Socket


class CompileModel(Node):
    """Runs the model's UNet compiled by torch.compile (channels-last; a graph per size, batch
    and precision, compiled on its first step: slow once, faster after). ``inductor``: generated
    kernels; ``cudagraphs``: the eager UNet with each step replayed as a CUDA graph (CUDA only).
    The pictures are the eager model's within float rounding."""

    category = "advanced/model"
    display_name = "Compile Model"
    aliases = ("TorchCompileModel",)
    inputs = {"model": Socket("MODEL"), "backend": Combo(choices=["inductor", "cudagraphs"])}
    outputs = [Output("MODEL")]

    def run(self, model, backend):
        from nodeflow.models import compiled
        from nodeflow.sampling import handle

        handle.unet(model, type(self).__name__)
        where = f"backend {backend!r}"
        if backend == "cudagraphs":
            compiled.check_cuda_graphs(model.device, where)
            options = compiled.CompileOptions(backend=None, cuda_graphs=True)
        else:
            compiled.check_compile(backend, model.device, where)
            options = compiled.CompileOptions(backend=backend)
        return (compiled.compile_model(model, options),)


class CompileVAE(Node):
    """Runs the VAE's decoder compiled by torch.compile (channels-last; a graph per latent size,
    compiled on its first decode)."""

    category = "advanced/model"
    display_name = "Compile VAE"
    inputs = {"vae": Socket("VAE")}
    outputs = [Output("VAE")]

    def run(self, vae):
        from nodeflow.models import compiled

        compiled.check_compile("inductor", vae.device, type(self).__name__)
        clone = copy.copy(vae)              # shares the module; the options are the clone's own
        clone.compile_options = compiled.CompileOptions()
        return (clone,)


class DeepCache(Node):
    """DeepCache: the UNet runs in full every ``cache_interval`` steps and, in between, only its
    shallow blocks (input blocks 0 … ``cache_depth`` and their output blocks), reusing the deep
    features of the last full step. Faster (the paper: 2.3× on SD 1.5) at a cost in fine
    detail; the pictures are no longer the full model's; 1 turns it off. It acts while the
    timestep t (999 → 0) is within 1000 − ``end_step`` … 1000 − ``start_step``."""

    category = "model_patches/unet"
    display_name = "Deep Cache"
    inputs = {
        "model": Socket("MODEL"),
        "cache_interval": Int(default=5, min=1, max=1000, step=1,
                              tooltip="steps between full UNet evaluations (1: every step, no caching)"),
        "cache_depth": Int(default=3, min=0, max=12, step=1,
                           tooltip="input blocks 0 … depth (and their output blocks) run at every step; "
                                   "a deeper cut is slower and closer to the full model"),
        "start_step": Int(default=0, min=0, max=1000, step=1, tooltip="caching starts at timestep 1000 − start_step"),
        "end_step": Int(default=1000, min=0, max=1000, step=1, tooltip="caching ends at timestep 1000 − end_step"),
    }
    outputs = [Output("MODEL")]

    def run(self, model, cache_interval, cache_depth, start_step, end_step):
        from nodeflow.models.step_cache import DeepCache as Cache
        from nodeflow.sampling import handle

        handle.unet(model, type(self).__name__)
        if handle.model_patches(model) is None:
            raise ValueError(f"this MODEL ({type(model).__name__}) takes no model patches")
        patched = model.clone()
        patched.model_patches.step_cache = Cache(cache_interval, cache_depth, start_step, end_step)
        return (patched,)
