"""The sampler names the KSampler nodes accept, in ComfyUI's order, and what each needs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from nodeflow.sampling import cfg_pp, dpm_solver, dpmpp, samplers, unipc

__all__ = ["SAMPLERS", "SAMPLER_NAMES", "SamplerSpec", "get_sampler"]


@dataclass(frozen=True)
class SamplerSpec:
    function: Callable                 # sample_xxx(model, x, sigmas, extra_args, callback, disable, **options)
    discard_penultimate: bool = False  # schedule computed for steps+1, the value before 0 dropped
    inpaint_random_noise: bool = False  # masked-area re-noising uses fresh noise (seed + 1), not the initial noise
    needs_schedule: bool = False       # gets the model's DiscreteSchedule as ``schedule=``


_S = SamplerSpec
SAMPLERS: dict[str, SamplerSpec] = {
    "euler": _S(samplers.sample_euler),
    "euler_cfg_pp": _S(cfg_pp.sample_euler_cfg_pp),
    "euler_ancestral": _S(samplers.sample_euler_ancestral),
    "euler_ancestral_cfg_pp": _S(cfg_pp.sample_euler_ancestral_cfg_pp),
    "heun": _S(samplers.sample_heun),
    "heunpp2": _S(samplers.sample_heunpp2),
    "exp_heun_2_x0": _S(dpmpp.sample_exp_heun_2_x0),
    "exp_heun_2_x0_sde": _S(dpmpp.sample_exp_heun_2_x0_sde),
    "dpm_2": _S(samplers.sample_dpm_2, discard_penultimate=True),
    "dpm_2_ancestral": _S(samplers.sample_dpm_2_ancestral, discard_penultimate=True),
    "lms": _S(samplers.sample_lms),
    "dpm_fast": _S(dpm_solver.sample_dpm_fast),
    "dpm_adaptive": _S(dpm_solver.sample_dpm_adaptive),
    "dpmpp_2s_ancestral": _S(dpmpp.sample_dpmpp_2s_ancestral),
    "dpmpp_2s_ancestral_cfg_pp": _S(cfg_pp.sample_dpmpp_2s_ancestral_cfg_pp),
    "dpmpp_sde": _S(dpmpp.sample_dpmpp_sde),
    "dpmpp_sde_gpu": _S(dpmpp.sample_dpmpp_sde_gpu),
    "dpmpp_2m": _S(dpmpp.sample_dpmpp_2m),
    "dpmpp_2m_cfg_pp": _S(cfg_pp.sample_dpmpp_2m_cfg_pp),
    "dpmpp_2m_sde": _S(dpmpp.sample_dpmpp_2m_sde),
    "dpmpp_2m_sde_gpu": _S(dpmpp.sample_dpmpp_2m_sde_gpu),
    "dpmpp_2m_sde_heun": _S(dpmpp.sample_dpmpp_2m_sde_heun),
    "dpmpp_2m_sde_heun_gpu": _S(dpmpp.sample_dpmpp_2m_sde_heun_gpu),
    "dpmpp_3m_sde": _S(dpmpp.sample_dpmpp_3m_sde),
    "dpmpp_3m_sde_gpu": _S(dpmpp.sample_dpmpp_3m_sde_gpu),
    "ddpm": _S(samplers.sample_ddpm),
    "lcm": _S(samplers.sample_lcm),
    "ipndm": _S(samplers.sample_ipndm),
    "ipndm_v": _S(samplers.sample_ipndm_v),
    "deis": _S(samplers.sample_deis),
    "res_multistep": _S(dpmpp.sample_res_multistep),
    "res_multistep_cfg_pp": _S(cfg_pp.sample_res_multistep_cfg_pp),
    "res_multistep_ancestral": _S(dpmpp.sample_res_multistep_ancestral),
    "res_multistep_ancestral_cfg_pp": _S(cfg_pp.sample_res_multistep_ancestral_cfg_pp),
    "gradient_estimation": _S(samplers.sample_gradient_estimation),
    "gradient_estimation_cfg_pp": _S(cfg_pp.sample_gradient_estimation_cfg_pp),
    "er_sde": _S(dpmpp.sample_er_sde),
    "seeds_2": _S(dpmpp.sample_seeds_2),
    "seeds_3": _S(dpmpp.sample_seeds_3),
    "sa_solver": _S(dpmpp.sample_sa_solver, needs_schedule=True),
    "sa_solver_pece": _S(dpmpp.sample_sa_solver_pece, needs_schedule=True),
    "ddim": _S(samplers.sample_ddim, inpaint_random_noise=True),
    "uni_pc": _S(unipc.sample_uni_pc, discard_penultimate=True),
    "uni_pc_bh2": _S(unipc.sample_uni_pc_bh2, discard_penultimate=True),
}

#: Every sampler name accepted, in ComfyUI's KSampler order.
SAMPLER_NAMES: list[str] = list(SAMPLERS)


def get_sampler(name: str) -> SamplerSpec:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; expected one of {SAMPLER_NAMES}") from None
