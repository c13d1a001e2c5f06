"""Training pipeline of Helix's demo pair (demo-target + demo-draft); ``train_demo.py`` is its entry point.

One module per job: ``config`` (settings and presets), ``common`` (logging, seeds, schedules), ``corpus``
(reading the stories), ``tokenizer`` (BPE, special tokens, chat template), ``chat_format`` (conversations
to token ids and loss masks), ``instruct`` (instruction/chat conversations built from the stories),
``copy_data`` (passages recombined across documents and told twice, for the copy fine-tune), ``streams``
(token streams and training windows), ``models`` (Llama configs, optimiser, save/load),
``target`` (training the target), ``distill_data`` (the target writes the draft's data), ``draft``
(distilling the draft), ``evaluate`` (held-out losses and acceptance through the Helix engine),
``cpu_timing`` (CPU step times) and ``cli`` (the command line).
"""
