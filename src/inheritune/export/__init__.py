"""Export: a trained checkpoint in formats other runtimes load (:mod:`inheritune.export.gguf`
for llama.cpp and Ollama; the command: :mod:`inheritune.export.command`)."""
