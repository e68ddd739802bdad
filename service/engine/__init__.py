"""The engine: model, slot KV cache, scheduler, sampling and detokenizer. It never imports grpc."""
