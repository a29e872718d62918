"""Chat templates: /v1/chat/completions' messages rendered into one prompt, as Hugging Face
tokenizers render theirs, from --chat_template (a Jinja file or a tokenizer_config.json) or
a plain default for base models."""
import json
from typing import Optional, Sequence

from scone_jax import protocol

# For base models (no template given): each message as "Role: content" and a blank line,
# then "Assistant:" for the model to continue.
DEFAULT = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: "
    "{{ message['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}")


def read_chat_template(path: str) -> str:
  """A Jinja chat template from a file: the template itself, or a Hugging Face
  tokenizer_config.json whose "chat_template" holds it (a string, or named templates of
  which "default" is used)."""
  with open(path, encoding='utf-8') as f:
    text = f.read()
  if not text.lstrip().startswith('{"') and not path.endswith('.json'):
    return text
  try:
    found = json.loads(text).get('chat_template')
  except (ValueError, AttributeError) as e:
    raise ValueError(f'--chat_template={path} is not a JSON object with "chat_template" '
                     f'({e}).') from None
  if isinstance(found, list):
    found = {t.get('name'): t.get('template') for t in found if isinstance(t, dict)}.get(
        'default')
  if not isinstance(found, str):
    raise ValueError(f'--chat_template={path} has no "chat_template" string (nor a named '
                     '"default" one); give the template file itself.')
  return found


class ChatTemplate:
  """A Jinja chat template rendered as Hugging Face tokenizers render theirs (a sandboxed
  environment, trim_blocks and lstrip_blocks, bos_token, eos_token, raise_exception)."""

  def __init__(self, source: Optional[str], bos_token: str, eos_token: str):
    import jinja2  # pylint: disable=g-import-not-at-top
    from jinja2 import sandbox  # pylint: disable=g-import-not-at-top
    self.source = source or DEFAULT
    self._error = jinja2.TemplateError
    env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message):
      raise jinja2.TemplateError(message)

    env.globals['raise_exception'] = raise_exception
    try:
      self._template = env.from_string(self.source)
    except jinja2.TemplateSyntaxError as e:
      raise ValueError(f'the chat template does not parse: {e}') from None
    self.bos_token, self.eos_token = bos_token, eos_token

  def render(self, messages: Sequence[protocol.ChatMessage],
             add_generation_prompt: bool = True) -> str:
    plain = [{'role': m.role, 'content': m.text(), **({'name': m.name} if m.name else {})}
             for m in messages]
    try:
      return self._template.render(messages=plain, add_generation_prompt=add_generation_prompt,
                                   bos_token=self.bos_token, eos_token=self.eos_token)
    except self._error as e:
      raise protocol.ApiError(400, f'the chat template refused these messages: {e}',
                              'messages') from None
    except Exception as e:  # pylint: disable=broad-except
      # A user's template may fail on any input (a missing key, a type): the request's fault.
      raise protocol.ApiError(400, f'the chat template failed on these messages '
                              f'({type(e).__name__}: {str(e)[:200]}).', 'messages') from None
