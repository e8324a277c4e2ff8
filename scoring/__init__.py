"""The challenge's metrics as a library: style similarity of colour histograms, FID with the
FID variant of InceptionV3, mask accuracy through a segmenter plug-in, and the aesthetic score
through a NIMA plug-in; ``scoring.challenge`` puts them together into the challenge's total T, and
``python -m tools.score`` is its command. ``scoring.sdm_evaluation`` scores SDM's samples as its paper
does (``python -m tools.score_sdm``)."""
