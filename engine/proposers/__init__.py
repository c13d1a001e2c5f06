"""Draft proposers: what suggests the K tokens the target then verifies."""

from engine.proposers.base import Proposal, Proposer, StepRows
from engine.proposers.draft_model import DraftModelProposer
from engine.proposers.ngram import NgramProposer

__all__ = ["DraftModelProposer", "NgramProposer", "Proposal", "Proposer", "StepRows"]
