"""BART and Marian: Whisper's three attentions (encoder self, decoder self, decoder ``encoder_attn`` cross) with
biases on q/k/v/out_proj and learned (BART) or sinusoidal (Marian) positions added at the input. Q-K and V-O are
exact; every K and V cache shrinks."""

from __future__ import annotations

from .whisper import Whisper


class Bart(Whisper):
    name = "bart"
    model_types = ("bart", "marian")
    examples = "BART, Marian"
    legacy_names = ()
