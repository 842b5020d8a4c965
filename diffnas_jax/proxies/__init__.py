"""Zero-cost proxies (grad_norm, snip, grasp, synflow, fisher, jacob_cov, naswot) and ranking
metrics (Kendall tau, Spearman rho, top-k precision, supernet-vs-standalone consistency)."""
from .ranking import (average_ranks, kendall_tau, ranking_consistency, spearman_rho, supernet_scores,
                      top_k_precision)
from .zero_cost import (PROXIES, fisher, get_proxy, grad_norm, grasp, jacob_cov, naswot, relu_activations,
                        score_all, score_population, snip, synflow)

__all__ = [
    "grad_norm", "snip", "grasp", "synflow", "fisher", "jacob_cov", "naswot", "get_proxy", "score_all", "score_population",
    "relu_activations", "PROXIES", "kendall_tau", "spearman_rho", "top_k_precision", "average_ranks",
    "supernet_scores", "ranking_consistency",
]
