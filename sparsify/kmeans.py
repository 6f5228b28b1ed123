"""Spherical k-means: k unit vectors that split a set of hidden states by direction.

A router scores a token by dot products with its rows, so rows of equal norm route each token to
the row it points closest to in angle: the assignment rule of spherical k-means (cosine
similarity), not of Euclidean k-means. No well-kept library does the spherical variant (scikit-
learn's KMeans is Euclidean, and not a dependency), and it is twenty lines of torch here:
k-means++ seeding on cosine distance, then Lloyd iterations, from a seeded generator, so that the
same states give the same centroids on every run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["spherical_kmeans"]


def spherical_kmeans(x: torch.Tensor, k: int, generator: torch.Generator, iterations: int = 100) -> torch.Tensor:
    """Unit centroids [k, H] of the rows of `x` [N, H] (N >= k) under cosine similarity."""
    if x.shape[0] < k:
        raise ValueError(f"{x.shape[0]} points cannot make {k} clusters")
    x = F.normalize(x.double(), dim=1)
    chosen = [int(torch.randint(x.shape[0], (1,), generator=generator))]
    distance = (1 - x @ x[chosen[0]]).clamp_min(0)
    for _ in range(1, k):
        if float(distance.sum()) > 0:
            pick = int(torch.multinomial(distance / distance.sum(), 1, generator=generator))
        else:  # every point coincides with a centroid already: any other point will do
            pick = next(i for i in range(x.shape[0]) if i not in chosen)
        chosen.append(pick)
        distance = torch.minimum(distance, (1 - x @ x[pick]).clamp_min(0))
    centroids = x[chosen].clone()
    assign = None
    for _ in range(iterations):
        similarity = x @ centroids.t()
        new = similarity.argmax(dim=1)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        for j in range(k):
            members = x[assign == j]
            if members.shape[0]:
                centroids[j] = F.normalize(members.sum(0), dim=0)
            else:  # an empty cluster takes the point its centroid set explains worst
                centroids[j] = x[similarity.max(dim=1).values.argmin()]
    return centroids.float()
