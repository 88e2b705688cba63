"""Data, in dependency order: ``records`` (Problem, PromptRecord), ``tokenizer``,
``arithmetic`` (the embedded task), ``datasets`` (local files, GSM8K, AIME, chat
templates), ``tasks`` (the job's RL prompt splits) and ``loader`` (the TrainSpec's
dataloaders). No module imports one after it."""
