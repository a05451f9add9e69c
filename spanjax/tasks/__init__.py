"""Tasks shared by training and evaluation: the data readers (`data`) and the attention-locality
examples and span queries (`locality`). Training and eval both import this layer, never each other."""
