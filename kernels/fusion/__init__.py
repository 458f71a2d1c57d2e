"""The fusion head's full-resolution passes (bbf_rt.model.fusion): flows up + both warps + input packing,
and the softmax mix."""
