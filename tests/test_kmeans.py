"""Spherical k-means finds the directions that hidden states cluster around."""

import torch
import torch.nn.functional as F

from sparsify.kmeans import spherical_kmeans


def test_recovers_separated_directions_whatever_their_norms():
    g = torch.Generator().manual_seed(0)
    directions = F.normalize(torch.randn(4, 32, generator=g), dim=1)
    labels = torch.arange(400) % 4
    norms = torch.rand(400, 1, generator=g) * 9 + 1  # the norm of a state says nothing of its cluster
    points = (directions[labels] + 0.1 * torch.randn(400, 32, generator=g)) * norms
    centroids = spherical_kmeans(points, 4, torch.Generator().manual_seed(1))
    assert torch.allclose(centroids.norm(dim=1), torch.ones(4))
    match = (centroids @ directions.t()).max(dim=1)
    assert match.values.min() > 0.99 and sorted(match.indices.tolist()) == [0, 1, 2, 3]


def test_seeded_and_never_empty():
    points = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    a = spherical_kmeans(points, 5, torch.Generator().manual_seed(7))
    b = spherical_kmeans(points, 5, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    same = torch.ones(10, 8)  # all points alike: still k unit centroids
    assert spherical_kmeans(same, 3, torch.Generator().manual_seed(0)).shape == (3, 8)
