"""Constitutional AI (Bai et al. 2022, "Constitutional AI: Harmlessness from AI Feedback").

A data stage: it writes training sets that the sft, reward and dpo stages read.

- :mod:`alignkit.stages.cai.constitution`: constitution files (principles with critique / revision
  requests and a multiple-choice question for AI feedback).
- :mod:`alignkit.stages.cai.revise`: supervised CAI, answer → critique → revision (N rounds), written
  as an SFT set and a preference set.
- :mod:`alignkit.stages.cai.feedback`: RLAIF, two sampled answers judged by a feedback model under
  sampled principles, both orders: preference pairs with soft labels.
- :mod:`alignkit.stages.cai.backends`: the generating model, local or an OpenAI-compatible endpoint.

Import-light: nothing is imported here (torch loads only where a model is used).
"""
