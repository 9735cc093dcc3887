"""The paper's architectures at configurable size, built by name through one registry.

``create("deep_fcn", depth=24)`` or ``deep_fcn(depth=24)``; ``list_models()`` gives every name,
``accepted_kwargs(name)`` the knobs a name's factory takes.

Each model is a plain ``nn.Module`` whose conceptual layers are submodules with stable dotted
names (``blocks.3``, ``layer2.1.conv1``, ``layers.0``), so forward hooks can find them.
"""

from repguide.models._registry import MODELS, accepted_kwargs, create, list_models, register, required_kwargs
from repguide.models.sequence import ParityRNN, RecurrentLM, copy_rnn, gru_lm, lstm_lm, parity_rnn, rnn_lm
from repguide.models.sequence_transformers import (
    ParityTransformer,
    TransformerLM,
    copy_transformer,
    parity_transformer,
    transformer_lm,
)
from repguide.models.vision import (
    FCN,
    ResNet,
    ResNetBlock,
    ViT,
    deep_fcn,
    plain_convnet,
    resnet18,
    resnet50,
    vit,
    wide_fcn,
)

__all__ = [
    "FCN",
    "MODELS",
    "ParityRNN",
    "ParityTransformer",
    "RecurrentLM",
    "ResNet",
    "ResNetBlock",
    "TransformerLM",
    "ViT",
    "accepted_kwargs",
    "required_kwargs",
    "copy_rnn",
    "copy_transformer",
    "create",
    "deep_fcn",
    "gru_lm",
    "list_models",
    "lstm_lm",
    "parity_rnn",
    "parity_transformer",
    "plain_convnet",
    "register",
    "resnet18",
    "resnet50",
    "rnn_lm",
    "transformer_lm",
    "vit",
    "wide_fcn",
]
