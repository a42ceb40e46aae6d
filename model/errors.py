"""Domain errors. The CLI prints them as one clear line; the bot logs them and keeps serving."""


class ChimeError(Exception):
    """Base class for every error Chime reports to a user."""


class ConfigError(ChimeError):
    """A configuration value is missing, malformed or impossible on this machine."""


class ModelLoadError(ChimeError):
    """A model, tokenizer or adapter could not be loaded."""


class ConversationFormatError(ChimeError):
    """A conversation file or transcript does not follow the shared format."""


class ChatTemplateError(ChimeError):
    """A tokenizer's chat template cannot render Chime's turn structure."""


class RemoteEngineError(ChimeError):
    """A remote inference server (the `openai` backend) could not be reached or gave an unusable answer."""
