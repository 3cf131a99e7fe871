"""metarm-fast: MetaRM reward-model training."""
__version__ = "0.1.0"


def load_reward_model(path, **kw):
    """A trained reward model from its export folder; ``.score(prompts, responses)`` gives its rewards
    (see ``metarm_fast.reward_model``). Imported on first use: ``import metarm_fast`` stays light."""
    from metarm_fast.reward_model import load_reward_model as load

    return load(path, **kw)
