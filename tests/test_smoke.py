from tokenstream.v1 import generation_pb2 as pb


def test_stream_concatenates_to_decode(stub, loaded_model):
    req = pb.GenerateRequest(prompt="你好，世界！", stopping=pb.StoppingCriteria(max_new_tokens=20))
    msgs = list(stub.Generate(req, timeout=30))
    text = "".join(m.text for m in msgs)
    ids = [t.id for m in msgs for t in m.tokens]
    assert msgs[-1].finish_reason == pb.FINISH_REASON_MAX_TOKENS
    assert len(ids) == 20 == msgs[-1].usage.completion_tokens
    assert text == loaded_model.tokenizer.decode(ids)
