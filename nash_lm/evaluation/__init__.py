"""Evaluation: the pairwise tournament of policies judged by a preference oracle (`tournament`)."""
