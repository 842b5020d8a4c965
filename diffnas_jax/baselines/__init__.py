"""Non-differentiable NAS baselines over any space's discrete codec: random search, local
search, regularised evolution and BANANAS-style predictor-guided search."""
from .codec import (CategoricalCodec, codec_for, darts_codec, layerwise_codec, nb201_codec, numpy_rng,
                    user_codec)
from .strategies import (STRATEGIES, Evaluator, History, bananas, get_strategy, local_search, random_search,
                         regularized_evolution)

__all__ = [
    "CategoricalCodec", "codec_for", "darts_codec", "layerwise_codec", "nb201_codec", "user_codec", "numpy_rng",
    "Evaluator", "History", "random_search", "local_search", "regularized_evolution", "bananas", "get_strategy",
    "STRATEGIES",
]
