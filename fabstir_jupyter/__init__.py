"""fabstir_jupyter: use a decentralised LLM network from Python and Jupyter."""
