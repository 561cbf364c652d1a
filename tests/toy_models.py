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


class ConcatBN(nn.Module):
    """MixNet/Inception style: convs of different kernels on channel splits, concatenated, then
    one BN (folds slice by slice); a second concat whose part is also used elsewhere (stays)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        self.b = nn.Conv2d(2, 5, 5, padding=2)
        self.c = nn.Conv2d(4, 4, 1, groups=2, bias=False)
        self.bn = nn.BatchNorm2d(12)
        self.d = nn.Conv2d(12, 4, 1)
        self.e = nn.Conv2d(12, 4, 3, padding=1)
        self.bn_shared = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x1, x2, x3 = torch.split(x, [2, 2, 4], 1)
        y = torch.relu(self.bn(torch.cat([self.a(x1), self.b(x2), self.c(x3)], 1)))
        d = self.d(y)
        z = self.bn_shared(torch.cat([d, self.e(y)], 1)) + d.mean()
        return self.head(z.mean((2, 3)))


class LinearBN(nn.Module):
    """BN1d around Linears (after, before, both), a BN before an unpadded conv (folds forward),
    a BN before a padded conv and a pre-activation BN (both stay)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pre = nn.BatchNorm2d(8)  # ReLU -> BN -> ReLU -> conv: pre-activation, stays
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn_pad = nn.BatchNorm2d(8)  # after relu, before a padded conv: stays
        self.conv_pad = nn.Conv2d(8, 8, 3, padding=1)
        self.bn_in = nn.BatchNorm2d(8)  # after relu, before an unpadded strided conv: folds into it
        self.conv_valid = nn.Conv2d(8, 6, 3, stride=2, groups=2)
        self.bn_head = nn.BatchNorm1d(6)  # after pooling, before fc1: folds into fc1
        self.fc1 = nn.Linear(6, 10, bias=False)
        self.bn_fc1 = nn.BatchNorm1d(10)  # after fc1: folds into fc1 (both directions on one layer)
        self.bn_fc2 = nn.BatchNorm1d(10)  # after relu, before fc2: folds into fc2
        self.fc2 = nn.Linear(10, 4)

    def forward(self, x):
        x = self.conv(torch.relu(self.pre(torch.relu(self.stem(x)))))
        x = self.conv_pad(self.bn_pad(torch.relu(x)))
        x = self.conv_valid(self.bn_in(torch.relu(x)))
        v = self.bn_fc1(self.fc1(self.bn_head(x.mean((2, 3)))))
        return self.fc2(self.bn_fc2(torch.relu(v)))


class ComputedWidths(nn.Module):
    """Its constructor computes on tensors (like torchvision's RegNet): no meta-device build."""

    def __init__(self):
        super().__init__()
        width = int(torch.tensor([2.0, 3.0]).prod().item())  # 6, read back from a tensor
        self.conv = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)

    def forward(self, x):
        return self.bn(self.conv(x)).mean((2, 3))


class Versioned(nn.Module):
    """Like torchvision's MNASNet: ``_load_from_state_dict`` requires the saved module version."""

    _version = 2

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        if local_metadata.get("version") != 2:
            raise ValueError(f"Versioned: version {local_metadata.get('version')} is not supported")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)

    def forward(self, x):
        return self.bn(self.conv(x)).mean((2, 3))


def broken():
    raise RuntimeError("this constructor is broken on purpose")


def concat_bn():
    return ConcatBN()


def linear_bn():
    return LinearBN()


def computed_widths():
    return ComputedWidths()


def versioned():
    return Versioned()
