"""Model builders shared by the tests and the benchmarks (they need torch): an architecture zoo written
from the papers, small ViT and Swin variants, and a synthetic shapes data set."""
