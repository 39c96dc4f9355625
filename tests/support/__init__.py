"""Model builders shared by the tests and the benchmarks (they need torch): an architecture zoo written
from the papers, small ViT and Swin variants, a synthetic shapes data set, the detector a package ships, and
finite differences. Outside the wheel: the tests import it as `support` (tests/ is on their path), the
benchmarks put tests/ on theirs."""
