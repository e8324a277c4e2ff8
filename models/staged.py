"""Gradient checkpointing for the SDM U-Net in Jittor: a staged pass that recomputes each block
in the backward pass and executes one block at a time.

Why staged. Jittor builds the whole training step as one lazy graph and runs it at the next sync.
A recompute written as a ``jt.Function`` (forward under no_grad, recompute in ``grad``) gives
correct gradients but no memory saving (measured, docs/training.md): every block's recompute is
part of the same graph, and the executor keeps what that graph references. What does save memory
is to never build that graph: run the forward block by block under ``no_grad`` and execute each
block's output at once (``sync``), keeping only the tensors that flow between blocks; then walk
the blocks backwards, rebuilding one block's graph at a time from its stored (detached) inputs,
differentiating it against the gradient of its output (``jt.grad(sum(out * g), inputs + params)``)
and executing that before the next. The peak is then the stored block boundaries plus one
block's activations, instead of every activation of the network.

What is stored: the time embedding, every encoder block's output (they are also the decoder's
skips) and the input of every decoder block. The gradient of a stored tensor is the sum over its
consumers: an encoder output feeds the next block and, through the concatenation, one decoder
block; the time embedding feeds every block, and its gradient finally flows into ``time_embed``.

    staged = StagedPass(unet, mask)
    out = staged.forward(x_t, t)                 # detached [B, out_channels, H, W], needs_grad leaf
    loss = loss_of(out)                          # any scalar built from ``out``
    grads = staged.backward(jt.grad(loss, out))  # {id(parameter): gradient} for every parameter

The result equals ``jt.grad(loss, unet.parameters())`` up to float32 rounding (tests/test_staged.py);
each block runs twice, so a step costs about one extra forward.
"""

from __future__ import annotations

import jittor_env  # noqa: F401  (must precede jittor)
import jittor as jt

from .unet import UNetModel, timestep_embedding


def check_staged(unet) -> None:
    """Refuse what the staged pass cannot do exactly: another network than the SDM U-Net, or
    dropout (the recompute would draw other masks)."""
    if not isinstance(unet, UNetModel):
        raise ValueError(f"gradient checkpointing works on the SDM U-Net (models.UNetModel), got {type(unet).__name__}")
    if unet.config.dropout > 0:
        raise ValueError("gradient checkpointing recomputes each block, so dropout (> 0 in this network) "
                         "would draw other masks in the recompute; train with dropout 0 (IIDM's) or "
                         "without checkpointing")


class StagedPass:
    """One staged forward and backward of ``unet`` under ``mask`` [B, num_classes, H, W]."""

    def __init__(self, unet: UNetModel, mask: jt.Var):
        check_staged(unet)
        self.unet = unet
        self.mask = mask
        self.output: jt.Var | None = None
        self._saved = None

    def forward(self, x_t: jt.Var, t: jt.Var) -> jt.Var:
        """The network's output, computed block by block without a graph; returns a detached copy
        that the loss can be differentiated against."""
        unet = self.unet
        unet._check_inputs(x_t, t, self.mask)
        torso = unet._torso_dtype
        mask = self.mask.cast(torso).detach()
        with jt.no_grad():
            emb = unet.time_embed(timestep_embedding(t, unet.model_channels))
            emb.sync()
            h = x_t.cast(torso).detach()
            skips = []
            for module in unet.input_blocks:
                h = module(h, emb, mask)
                h.sync()
                skips.append(h)
            h = unet.middle_block(h, emb, mask)
            h.sync()
            decoder_inputs = []
            for module, skip in zip(unet.output_blocks, reversed(skips)):
                decoder_inputs.append(h)
                h = module(jt.concat([h, skip], dim=1), emb, mask)
                h.sync()
            out = unet.out(h.cast(x_t.dtype))
            out.sync()
        self.output = out.detach().start_grad()
        self._saved = dict(t=t, x=x_t.cast(torso).detach(), x_dtype=x_t.dtype, mask=mask, emb=emb, skips=skips,
                           decoder_inputs=decoder_inputs, last=h)
        return self.output

    @staticmethod
    def _block_grads(fn, inputs: list, needs_grad: list, params: list, grad_out: jt.Var) -> tuple[list, list]:
        """Rebuild ``fn(*inputs)`` with a graph, differentiate sum(output * grad_out) with respect to
        the inputs that need a gradient and ``params``, and execute it. Returns (one gradient or
        None per input, one gradient per parameter)."""
        leaves = [v.detach().start_grad() if need else v.detach() for v, need in zip(inputs, needs_grad)]
        with jt.enable_grad():
            output = fn(*leaves)
        wrt = [v for v, need in zip(leaves, needs_grad) if need] + params
        grads = jt.grad((output * grad_out.cast(output.dtype)).sum(), wrt)
        jt.sync(grads)
        grads = [g.detach() for g in grads]   # cut from the block's graph, which is then released
        it = iter(grads[:len(wrt) - len(params)])
        return [next(it) if need else None for need in needs_grad], grads[len(wrt) - len(params):]

    def backward(self, grad_out: jt.Var) -> dict[int, jt.Var]:
        """Gradients of the loss whose gradient with respect to ``forward``'s output is
        ``grad_out``: {id(parameter): gradient} for every parameter of the network."""
        if self._saved is None:
            raise RuntimeError("StagedPass.backward needs a forward first (and runs once per forward)")
        unet, s = self.unet, self._saved
        self._saved = None
        mask, emb, skips = s["mask"], s["emb"], s["skips"]
        grads: dict[int, jt.Var] = {}
        grad_emb: list[jt.Var] = []

        def stage(module, fn, inputs, needs_grad, grad):
            input_grads, param_grads = self._block_grads(fn, inputs, needs_grad, _params(module), grad)
            for p, g in zip(_params(module), param_grads):
                grads[id(p)] = grads[id(p)] + g if id(p) in grads else g
            return input_grads

        # head: out(h) of the last decoder output
        (g,) = stage(unet.out, lambda h: unet.out(h.cast(s["x_dtype"])), [s["last"]], [True], grad_out)
        # decoder, last block first; block k took skips[-1 - k]
        grad_skips: list = [None] * len(skips)
        for k in range(len(unet.output_blocks) - 1, -1, -1):
            module = unet.output_blocks[k]
            g, grad_skips[-1 - k], g_emb = stage(
                module, lambda h, skip, e, module=module: module(jt.concat([h, skip], dim=1), e, mask),
                [s["decoder_inputs"][k], skips[-1 - k], emb], [True, True, True], g)
            grad_emb.append(g_emb)
        # middle block, fed by the last encoder output
        g, g_emb = stage(unet.middle_block, lambda h, e: unet.middle_block(h, e, mask),
                         [skips[-1], emb], [True, True], g)
        grad_emb.append(g_emb)
        # encoder, last block first: block i's output went on to the next block and to a skip
        for i in range(len(unet.input_blocks) - 1, -1, -1):
            g = g + grad_skips[i]
            module = unet.input_blocks[i]
            h_in = skips[i - 1] if i else s["x"]
            g, g_emb = stage(module, lambda h, e, module=module: module(h, e, mask), [h_in, emb],
                             [i > 0, True], g)
            grad_emb.append(g_emb)
        # the time embedding, which every block used
        t = s["t"]
        total = grad_emb[0]
        for g_emb in grad_emb[1:]:
            total = total + g_emb
        stage(unet.time_embed, lambda: unet.time_embed(timestep_embedding(t, unet.model_channels)), [], [],
              total)
        return grads


def _params(module) -> list[jt.Var]:
    return [p for p in module.parameters() if not p.is_stop_grad()]
