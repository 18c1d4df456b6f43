"""`edgegpt quantize`: precision recipes over an fp32 bundle, with the quality of each result measured."""
