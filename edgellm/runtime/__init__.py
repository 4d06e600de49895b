"""The runtime plumbing under a loaded model: the bundle and its graph, the onnxruntime runner,
the KV caches, execution providers and device profiles. Nothing here decodes text."""
