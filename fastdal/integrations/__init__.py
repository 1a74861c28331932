"""fastdal inside the active-learning libraries people already use: one module per library.

    from fastdal.integrations.baal import ...        # baal's ActiveLearningLoop
    from fastdal.integrations.skactiveml import ...  # scikit-activeml pool query strategies (skorch classifiers)
    from fastdal.integrations.small_text import ...  # small-text query strategies (PyTorch, transformers)
    from fastdal.integrations.modal import ...       # modAL query strategies (skorch NeuralNetClassifier)

Importing ``fastdal`` or ``fastdal.integrations`` imports none of these libraries; a module imports its
library when it is imported itself, and says how to install it when it is missing. Every adapter runs an
:class:`Acquisition` (method "dynamic", "badge" or "greedy", with ``layers``, ``gamma``, ``backend``,
``device`` and the batch mappings), so its picks are those of fastdal's own API on the same model and data.
"""

from ._common import METHODS, Acquisition

__all__ = ["METHODS", "Acquisition"]
