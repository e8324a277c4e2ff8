"""Latent diffusion: noise schedule, losses, guidance, samplers, EMA, the diffusion training task
and inference stages. Receives networks as arguments; imports no network class."""

from importlib import import_module

from .respace import (SOLVER_SPACINGS, Stage, iidm_stage, respace, solver_stage, solver_timesteps,
                      space_timesteps, spaced_stage)
from .schedule import Schedule, ScheduleConfig, make_schedule

# The Jittor-based parts load on first use, so numpy-only users of the package (schedules,
# checkpoint files) do not pay for importing Jittor.
_LAZY = {
    "q_sample": "diffusion", "q_posterior_mean_variance": "diffusion",
    "p_mean_variance": "diffusion", "predict_xstart_from_eps": "diffusion",
    "predict_eps_from_xstart": "diffusion",
    "training_losses": "losses", "normal_kl": "losses",
    "discretized_gaussian_log_likelihood": "losses",
    "ddim_step": "samplers", "ddpm_step": "samplers",
    "ddim_sample": "samplers", "ddpm_sample": "samplers", "dpm_solver_pp_2m": "samplers",
    "dpm_solver_pp_3m": "samplers", "unipc": "samplers", "SAMPLERS": "samplers",
    "img2img_start": "samplers", "img2img": "samplers", "PerImageNoise": "samplers",
    "global_noise": "samplers",
    "classifier_free_guidance": "guidance", "drop_masks": "guidance", "null_mask_like": "guidance",
    "Round": "pipeline", "preset_rounds": "pipeline", "run_rounds": "pipeline", "unet_passes": "pipeline",
    "PRESETS": "pipeline",
}

__all__ = ["Schedule", "ScheduleConfig", "make_schedule", "Stage", "iidm_stage", "spaced_stage",
           "solver_stage", "solver_timesteps", "SOLVER_SPACINGS", "space_timesteps", "respace", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'ldm' has no attribute {name!r}")
