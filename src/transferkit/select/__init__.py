"""The select stage: rank source models for the target (LogME, LEEP, kNN, a linear probe) and confirm the top ones."""
