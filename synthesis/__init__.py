"""Generating landscapes: ``Generator`` (the networks loaded once, IIDM's rounds on a batch),
batch generation of a test folder with atomic, resumable outputs (``synthesis.batch``), Reinhard
colour transfer, the HTML gallery, the embedded demo and the model files a run loads
(``synthesis.model_files``).

    from synthesis import Generator, color_transfer

``Generator`` imports Jittor when first used; call ``jittor_env.setup()`` before.
"""

from synthesis.color_transfer import color_transfer


def __getattr__(name):
    if name == "Generator":
        from synthesis.generator import Generator
        return Generator
    raise AttributeError(f"module 'synthesis' has no attribute {name!r}")


__all__ = ["Generator", "color_transfer"]
