"""Small networks for conv-bn tests, importable as `--model toy_models:NAME` (tests/ is on sys.path)."""

from __future__ import annotations

import torch
from torch import nn


class ReversedOrder(nn.Module):
    """The BN is declared before the conv that feeds it: module order lies, dataflow does not."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.head(x.mean((2, 3)))


class Tricky(nn.Module):
    """One case per rule: what folds and what must stay."""

    def __init__(self):
        super().__init__()
        self.conv_ok = nn.Conv2d(3, 8, 3, padding=1)
        self.bn_ok = nn.BatchNorm2d(8)
        self.conv_shared = nn.Conv2d(8, 8, 1, bias=False)  # its output also feeds a residual add
        self.bn_shared = nn.BatchNorm2d(8)
        self.bn_cat = nn.BatchNorm2d(16)  # after a concatenation
        self.bn_pre = nn.BatchNorm2d(16)  # before a conv (pre-activation style), after a ReLU
        self.conv_after = nn.Conv2d(16, 8, 3, padding=1)
        self.bn_nostats = nn.BatchNorm2d(8, track_running_stats=False)
        self.conv_nostats = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 6)
        self.bn1d = nn.BatchNorm1d(6)  # Linear + BN1d on a 2-D input: folds
        self.seq_fc = nn.Linear(5, 5)
        self.bn_seq = nn.BatchNorm1d(4)  # on (N, C, L) it normalizes another axis: stays

    def forward(self, x):
        a = torch.relu(self.bn_ok(self.conv_ok(x)))
        s = self.conv_shared(a)
        b = self.bn_shared(s) + s
        c = self.bn_cat(torch.cat([a, b], 1))
        d = self.conv_after(self.bn_pre(torch.relu(c)))
        e = self.bn_nostats(self.conv_nostats(d))
        v = self.bn1d(self.fc(e.mean((2, 3))))
        seq = self.bn_seq(self.seq_fc(e[:, :4, 0, :5]))
        return v + seq.mean()


class InPlace(nn.Module):
    """The conv output is modified in place before the BN sees it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        y.mul_(2.0)
        return self.bn(y)


class Transposed(nn.Module):
    def __init__(self, groups: int = 2):
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn(self.up(x))


def reversed_order():
    return ReversedOrder()


def tricky():
    return Tricky()


def in_place():
    return InPlace()


def transposed():
    return Transposed()
