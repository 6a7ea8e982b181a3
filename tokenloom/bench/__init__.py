"""Benchmarks that print their figures next to a baseline measured in the same run (`tokenloom bench ...`)."""
