"""Embedded tasks: exact token-level games (`token_game`), docstring summarization (`docstrings`) and its automatic rater panel (`rater`)."""
