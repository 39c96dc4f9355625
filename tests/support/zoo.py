"""A zoo of small but faithful replicas of real CNN architecture families, for gradient tests.

Each builder returns a deterministic eval-mode `nn.Module` (it seeds torch itself). The layouts follow
the reference implementations (torchvision unless said otherwise): the same module types, the same
forward code, the same module names (so target layers read as they do on the real models); only the
widths, depths and input sizes are scaled down so that export and checks take a second or two.

BatchNorm layers get random affine parameters, and running statistics measured on random inputs
(cumulative average over a few train-mode batches), so that they are neither identities nor blow
the activations up: every ReLU is about half open, as in a trained network.

`ZOO` lists (name, builder, input_shape, target layer module names).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

NUM_CLASSES = 10


def _calibrate(model: nn.Module, input_shape, seed: int = 0, gain=(0.5, 1.5)) -> nn.Module:
    """Random BatchNorm affine parameters (scale drawn uniformly from `gain`), running statistics measured
    on random inputs, eval mode."""
    generator = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for norm in norms:
            norm.weight.uniform_(*gain, generator=generator)
            norm.bias.normal_(0.0, 0.2, generator=generator)
            norm.reset_running_stats()
            norm.momentum = None  # cumulative moving average
        if norms:
            model.train()
            for _ in range(3):
                model(torch.randn(8, *input_shape, generator=generator))
    return model.eval()


# --------------------------------------------------------------------------------------------------
# ResNet / ResNeXt (torchvision.models.resnet), base width 8 instead of 64
# --------------------------------------------------------------------------------------------------
RESNET_BASE = 8


def conv3x3(in_planes, out_planes, stride=1, groups=1, dilation=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation, groups=groups,
                     bias=False, dilation=dilation)


def conv1x1(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=RESNET_BASE, dilation=1):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=RESNET_BASE, dilation=1):
        super().__init__()
        width = int(planes * (base_width / RESNET_BASE)) * groups  # torchvision: base_width / 64.0
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class ResNet(nn.Module):
    def __init__(self, block, layers, num_classes=NUM_CLASSES, groups=1, width_per_group=RESNET_BASE,
                 replace_stride_with_dilation=None):
        super().__init__()
        self.inplanes = RESNET_BASE
        self.dilation = 1
        replace_stride_with_dilation = replace_stride_with_dilation or [False, False, False]
        self.groups = groups
        self.base_width = width_per_group
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        b = RESNET_BASE
        self.layer1 = self._make_layer(block, b, layers[0])
        self.layer2 = self._make_layer(block, 2 * b, layers[1], stride=2, dilate=replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 4 * b, layers[2], stride=2, dilate=replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 8 * b, layers[3], stride=2, dilate=replace_stride_with_dilation[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * b * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width, previous_dilation)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=self.groups, base_width=self.base_width,
                                dilation=self.dilation))
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)
        return x


def resnet18() -> nn.Module:
    """ResNet-18 (basic blocks, [2, 2, 2, 2]), widths 8-16-32-64; 64x64 input, layer4 is 2x2."""
    torch.manual_seed(0)
    return _calibrate(ResNet(BasicBlock, [2, 2, 2, 2]), (3, 64, 64))


def resnet50() -> nn.Module:
    """ResNet-50 layout (bottleneck blocks, expansion 4), depths cut to [2, 2, 2, 2] (ResNet-26)."""
    torch.manual_seed(0)
    return _calibrate(ResNet(Bottleneck, [2, 2, 2, 2]), (3, 64, 64))


def resnext_dilated() -> nn.Module:
    """ResNeXt (grouped 3x3 convs, 4 groups x width 4, the '32x4d' recipe scaled), with layer4 dilated
    instead of strided (replace_stride_with_dilation=[False, False, True], as DeepLab backbones do)."""
    torch.manual_seed(0)
    model = ResNet(Bottleneck, [1, 2, 2, 2], groups=4, width_per_group=4,
                   replace_stride_with_dilation=[False, False, True])
    return _calibrate(model, (3, 64, 64))


# --------------------------------------------------------------------------------------------------
# VGG (torchvision.models.vgg), cfg "A" (VGG-11) with widths / 8
# --------------------------------------------------------------------------------------------------
class VGG(nn.Module):
    def __init__(self, features, num_classes=NUM_CLASSES, dropout=0.5, pool=7):
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((pool, pool))
        self.classifier = nn.Sequential(
            nn.Linear(64 * pool * pool, 64), nn.ReLU(True), nn.Dropout(p=dropout),
            nn.Linear(64, 64), nn.ReLU(True), nn.Dropout(p=dropout),
            nn.Linear(64, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)

    def forward(self, x):
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x


def _vgg_layers(cfg, batch_norm=False):
    layers, in_channels = [], 3
    for v in cfg:
        if v == "M":
            layers += [nn.MaxPool2d(kernel_size=2, stride=2)]
        else:
            conv2d = nn.Conv2d(in_channels, v, kernel_size=3, padding=1)
            if batch_norm:
                layers += [conv2d, nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            else:
                layers += [conv2d, nn.ReLU(inplace=True)]
            in_channels = v
    return nn.Sequential(*layers)


VGG11_CFG = [8, "M", 16, "M", 32, 32, "M", 64, 64, "M", 64, 64, "M"]
VGG16_CFG = [8, 8, "M", 16, 16, "M", 32, 32, 32, "M", 64, 64, 64, "M", 64, 64, 64, "M"]


def vgg11() -> nn.Module:
    """torchvision's VGG-11 as it is, AdaptiveAvgPool2d((7, 7)) included, on a small image: the last pool
    leaves 2x2, which the adaptive pool spreads over 7x7 (what torchvision's VGG does on any input under
    224x224). Target features.19: the ReLU before the last MaxPool, as pytorch-grad-cam advises for VGG."""
    torch.manual_seed(0)
    return _calibrate(VGG(_vgg_layers(VGG11_CFG)), (3, 64, 64))


def vgg16_bn() -> nn.Module:
    """VGG-16 with BatchNorm, scaled as a whole: 64x64 input ends at 2x2 after five pools, so the adaptive
    pool is AdaptiveAvgPool2d((2, 2)), the counterpart of torchvision's 7x7 at 224x224. Target features.42:
    the ReLU before the last MaxPool."""
    torch.manual_seed(0)
    return _calibrate(VGG(_vgg_layers(VGG16_CFG, batch_norm=True), pool=2), (3, 64, 64))


# --------------------------------------------------------------------------------------------------
# torchvision.ops.misc building blocks
# --------------------------------------------------------------------------------------------------
def _make_divisible(v, divisor, min_value=None):
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class Conv2dNormActivation(nn.Sequential):
    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=None, groups=1,
                 norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU, dilation=1, inplace=True, bias=None):
        if padding is None:
            padding = (kernel_size - 1) // 2 * dilation
        if bias is None:
            bias = norm_layer is None
        layers = [nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation=dilation,
                            groups=groups, bias=bias)]
        if norm_layer is not None:
            layers.append(norm_layer(out_channels))
        if activation_layer is not None:
            params = {} if inplace is None else {"inplace": inplace}
            layers.append(activation_layer(**params))
        super().__init__(*layers)
        self.out_channels = out_channels


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation: avgpool -> 1x1 conv -> activation -> 1x1 conv -> scale activation."""

    def __init__(self, input_channels, squeeze_channels, activation=nn.ReLU, scale_activation=nn.Sigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def _scale(self, input):
        scale = self.avgpool(input)
        scale = self.fc1(scale)
        scale = self.activation(scale)
        scale = self.fc2(scale)
        return self.scale_activation(scale)

    def forward(self, input):
        scale = self._scale(input)
        return scale * input


class Permute(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return torch.permute(x, self.dims)


# --------------------------------------------------------------------------------------------------
# MobileNetV3 (torchvision.models.mobilenetv3), the "small" recipe with widths halved
# --------------------------------------------------------------------------------------------------
class InvertedResidualConfig:
    def __init__(self, input_channels, kernel, expanded_channels, out_channels, use_se, activation, stride, dilation):
        self.input_channels = input_channels
        self.kernel = kernel
        self.expanded_channels = expanded_channels
        self.out_channels = out_channels
        self.use_se = use_se
        self.use_hs = activation == "HS"
        self.stride = stride
        self.dilation = dilation


class MobileNetV3Block(nn.Module):
    """torchvision's mobilenetv3.InvertedResidual."""

    def __init__(self, cnf, norm_layer):
        super().__init__()
        self.use_res_connect = cnf.stride == 1 and cnf.input_channels == cnf.out_channels
        layers = []
        activation_layer = nn.Hardswish if cnf.use_hs else nn.ReLU
        if cnf.expanded_channels != cnf.input_channels:
            layers.append(Conv2dNormActivation(cnf.input_channels, cnf.expanded_channels, kernel_size=1,
                                               norm_layer=norm_layer, activation_layer=activation_layer))
        stride = 1 if cnf.dilation > 1 else cnf.stride
        layers.append(Conv2dNormActivation(cnf.expanded_channels, cnf.expanded_channels, kernel_size=cnf.kernel,
                                           stride=stride, dilation=cnf.dilation, groups=cnf.expanded_channels,
                                           norm_layer=norm_layer, activation_layer=activation_layer))
        if cnf.use_se:
            squeeze_channels = _make_divisible(cnf.expanded_channels // 4, 8)
            layers.append(SqueezeExcitation(cnf.expanded_channels, squeeze_channels, scale_activation=nn.Hardsigmoid))
        layers.append(Conv2dNormActivation(cnf.expanded_channels, cnf.out_channels, kernel_size=1,
                                           norm_layer=norm_layer, activation_layer=None))
        self.block = nn.Sequential(*layers)

    def forward(self, input):
        result = self.block(input)
        if self.use_res_connect:
            result += input
        return result


class MobileNetV3(nn.Module):
    def __init__(self, settings, last_channel, num_classes=NUM_CLASSES, dropout=0.2):
        super().__init__()
        norm_layer = lambda c: nn.BatchNorm2d(c, eps=0.001, momentum=0.01)  # noqa: E731
        first = settings[0].input_channels
        layers = [Conv2dNormActivation(3, first, kernel_size=3, stride=2, norm_layer=norm_layer,
                                       activation_layer=nn.Hardswish)]
        layers += [MobileNetV3Block(cnf, norm_layer) for cnf in settings]
        last_in = settings[-1].out_channels
        last_out = 6 * last_in
        layers.append(Conv2dNormActivation(last_in, last_out, kernel_size=1, norm_layer=norm_layer,
                                           activation_layer=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(last_out, last_channel), nn.Hardswish(inplace=True),
                                        nn.Dropout(p=dropout, inplace=True), nn.Linear(last_channel, num_classes))

    def forward(self, x):
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x


def mobilenet_v3_small() -> nn.Module:
    """MobileNetV3-Small's first five bottlenecks (SE with Hardsigmoid, ReLU then Hardswish, depthwise
    3x3 and 5x5), widths halved; 64x64 input, features.6 (the last 1x1 conv) is 4x4. BatchNorm scales
    of 1 to 3 and wide SE gate inputs put values on every piece of Hardswish and Hardsigmoid (both
    saturations included), as in a trained network."""
    torch.manual_seed(0)
    c = InvertedResidualConfig
    settings = [c(8, 3, 8, 8, True, "RE", 2, 1), c(8, 3, 36, 12, False, "RE", 2, 1),
                c(12, 3, 44, 12, False, "RE", 1, 1), c(12, 5, 48, 20, True, "HS", 2, 1),
                c(20, 5, 120, 20, True, "HS", 1, 1)]
    model = MobileNetV3(settings, last_channel=64)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SqueezeExcitation):
                m.fc2.weight.mul_(8.0)
                m.fc2.bias.normal_(0.0, 2.0)
    return _calibrate(model, (3, 64, 64), gain=(1.0, 3.0))


# --------------------------------------------------------------------------------------------------
# MobileNetV2 (torchvision.models.mobilenetv2): ReLU6 everywhere, linear bottlenecks
# --------------------------------------------------------------------------------------------------
class MobileNetV2Block(nn.Module):
    def __init__(self, inp, oup, stride, expand_ratio):
        super().__init__()
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers = []
        if expand_ratio != 1:
            layers.append(Conv2dNormActivation(inp, hidden_dim, kernel_size=1, activation_layer=nn.ReLU6))
        layers.extend([
            Conv2dNormActivation(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim, activation_layer=nn.ReLU6),
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ])
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, settings, num_classes=NUM_CLASSES, dropout=0.2, input_channel=8, last_channel=64):
        super().__init__()
        features = [Conv2dNormActivation(3, input_channel, stride=2, activation_layer=nn.ReLU6)]
        for t, c, n, s in settings:
            for i in range(n):
                features.append(MobileNetV2Block(input_channel, c, s if i == 0 else 1, expand_ratio=t))
                input_channel = c
        features.append(Conv2dNormActivation(input_channel, last_channel, kernel_size=1, activation_layer=nn.ReLU6))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(last_channel, num_classes))

    def forward(self, x):
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x


def mobilenet_v2() -> nn.Module:
    """MobileNetV2 (ReLU6 = Clip(0, 6)), settings t,c,n,s cut to four stages; 64x64 -> 4x4 at features.7.
    BatchNorm scales of 1.5 to 4.5 make a few percent of the ReLU6 inputs exceed 6."""
    torch.manual_seed(0)
    settings = [[1, 8, 1, 1], [6, 12, 2, 2], [6, 16, 2, 2], [6, 24, 1, 2]]
    return _calibrate(MobileNetV2(settings), (3, 64, 64), gain=(1.5, 4.5))


# --------------------------------------------------------------------------------------------------
# DenseNet (torchvision.models.densenet), growth 4, bn_size 4, blocks (2, 3, 2)
# --------------------------------------------------------------------------------------------------
class _DenseLayer(nn.Module):
    def __init__(self, num_input_features, growth_rate, bn_size, drop_rate):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = float(drop_rate)

    def bn_function(self, inputs):
        concated_features = torch.cat(inputs, 1)
        return self.conv1(self.relu1(self.norm1(concated_features)))

    def forward(self, input):
        prev_features = [input] if isinstance(input, torch.Tensor) else input
        bottleneck_output = self.bn_function(prev_features)
        new_features = self.conv2(self.relu2(self.norm2(bottleneck_output)))
        if self.drop_rate > 0:
            new_features = F.dropout(new_features, p=self.drop_rate, training=self.training)
        return new_features


class _DenseBlock(nn.ModuleDict):
    def __init__(self, num_layers, num_input_features, bn_size, growth_rate, drop_rate):
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size, drop_rate)
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, init_features):
        features = [init_features]
        for _, layer in self.items():
            new_features = layer(features)
            features.append(new_features)
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    def __init__(self, num_input_features, num_output_features):
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    def __init__(self, growth_rate=4, block_config=(2, 3, 2), num_init_features=8, bn_size=4, drop_rate=0.1,
                 num_classes=NUM_CLASSES):
        super().__init__()
        self.features = nn.Sequential(OrderedDict([
            ("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
            ("norm0", nn.BatchNorm2d(num_init_features)),
            ("relu0", nn.ReLU(inplace=True)),
            ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
        ]))
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = _DenseBlock(num_layers, num_features, bn_size, growth_rate, drop_rate)
            self.features.add_module(f"denseblock{i + 1}", block)
            num_features = num_features + num_layers * growth_rate
            if i != len(block_config) - 1:
                trans = _Transition(num_features, num_features // 2)
                self.features.add_module(f"transition{i + 1}", trans)
                num_features = num_features // 2
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)

    def forward(self, x):
        features = self.features(x)
        out = F.relu(features, inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        out = torch.flatten(out, 1)
        out = self.classifier(out)
        return out


def densenet() -> nn.Module:
    """DenseNet-121's layout (concatenating dense layers BN-ReLU-conv1x1-BN-ReLU-conv3x3, transitions with
    AvgPool2d, dropout 0.1 in the layers), blocks (2, 3, 2); 64x64 input, denseblock2 is 8x8."""
    torch.manual_seed(0)
    return _calibrate(DenseNet(), (3, 64, 64))


# --------------------------------------------------------------------------------------------------
# ConvNeXt (torchvision.models.convnext), dims 8-16-32-48, depths (1, 1, 2, 1)
# --------------------------------------------------------------------------------------------------
class LayerNorm2d(nn.LayerNorm):
    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        x = x.permute(0, 3, 1, 2)
        return x


class CNBlock(nn.Module):
    def __init__(self, dim, layer_scale):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim, bias=True),
            Permute([0, 2, 3, 1]),
            nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(in_features=dim, out_features=4 * dim, bias=True),
            nn.GELU(),
            nn.Linear(in_features=4 * dim, out_features=dim, bias=True),
            Permute([0, 3, 1, 2]),
        )
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * layer_scale)
        self.stochastic_depth = nn.Identity()  # StochasticDepth is the identity in eval mode

    def forward(self, input):
        result = self.layer_scale * self.block(input)
        result = self.stochastic_depth(result)
        result += input
        return result


class ConvNeXt(nn.Module):
    def __init__(self, dims=(8, 16, 32, 48), depths=(1, 1, 2, 1), num_classes=NUM_CLASSES):
        super().__init__()
        norm_layer = lambda c: LayerNorm2d(c, eps=1e-6)  # noqa: E731
        layers = [Conv2dNormActivation(3, dims[0], kernel_size=4, stride=4, padding=0, norm_layer=norm_layer,
                                       activation_layer=None, bias=True)]
        for i, (dim, depth) in enumerate(zip(dims, depths, strict=True)):
            layers.append(nn.Sequential(*[CNBlock(dim, layer_scale=1e-6) for _ in range(depth)]))
            if i + 1 < len(dims):
                layers.append(nn.Sequential(norm_layer(dim), nn.Conv2d(dim, dims[i + 1], kernel_size=2, stride=2)))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(norm_layer(dims[-1]), nn.Flatten(1), nn.Linear(dims[-1], num_classes))
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.features(x)
        x = self.avgpool(x)
        x = self.classifier(x)
        return x


def convnext() -> nn.Module:
    """ConvNeXt (depthwise 7x7, permute to NHWC, LayerNorm over channels, Linear-GELU-Linear, permute back,
    layer scale, residual; LayerNorm2d + 2x2 stride-2 conv downsampling). The init's layer scale of 1e-6
    would make every block an identity, so the builder draws layer scales, LayerNorm affine parameters
    and biases at random, as after training. 64x64 input: features.5 is 4x4, features.7 is 2x2."""
    torch.manual_seed(0)
    return _randomize_convnext(ConvNeXt()).eval()


# --------------------------------------------------------------------------------------------------
# ConvNeXt as in the authors' code (facebookresearch/ConvNeXt, models/convnext.py): layer scale `gamma`
# applied in NHWC, a hand-written channels-first LayerNorm (mean, pow, sqrt) in the stem and the
# downsampling layers, and a head that takes x.mean([-2, -1]) then nn.LayerNorm.
# --------------------------------------------------------------------------------------------------
class ConvNeXtLayerNorm(nn.Module):
    def __init__(self, normalized_shape, eps=1e-6, data_format="channels_last"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(normalized_shape))
        self.bias = nn.Parameter(torch.zeros(normalized_shape))
        self.eps = eps
        self.data_format = data_format
        self.normalized_shape = (normalized_shape,)

    def forward(self, x):
        if self.data_format == "channels_last":
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        x = self.weight[:, None, None] * x + self.bias[:, None, None]
        return x


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim, layer_scale_init_value=1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = ConvNeXtLayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(layer_scale_init_value * torch.ones(dim), requires_grad=True)
        self.drop_path = nn.Identity()

    def forward(self, x):
        input = x
        x = self.dwconv(x)
        x = x.permute(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
        x = self.norm(x)
        x = self.pwconv1(x)
        x = self.act(x)
        x = self.pwconv2(x)
        x = self.gamma * x
        x = x.permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
        x = input + self.drop_path(x)
        return x


class ConvNeXtOfficial(nn.Module):
    def __init__(self, in_chans=3, num_classes=NUM_CLASSES, depths=(1, 1, 2, 1), dims=(8, 16, 32, 48)):
        super().__init__()
        self.downsample_layers = nn.ModuleList()
        self.downsample_layers.append(nn.Sequential(nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4),
                                                    ConvNeXtLayerNorm(dims[0], eps=1e-6, data_format="channels_first")))
        for i in range(3):
            self.downsample_layers.append(nn.Sequential(
                ConvNeXtLayerNorm(dims[i], eps=1e-6, data_format="channels_first"),
                nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2)))
        self.stages = nn.ModuleList(nn.Sequential(*[ConvNeXtBlock(dims[i]) for _ in range(depths[i])])
                                    for i in range(4))
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)

    def forward_features(self, x):
        for i in range(4):
            x = self.downsample_layers[i](x)
            x = self.stages[i](x)
        return self.norm(x.mean([-2, -1]))  # global average pooling, (N, C, H, W) -> (N, C)

    def forward(self, x):
        return self.head(self.forward_features(x))


def convnext_official() -> nn.Module:
    """ConvNeXt in the layout of the authors' repository; weights drawn as for `convnext` (layer scales,
    norm affine parameters, biases at random). 64x64 input: stages.2 is 4x4, stages.3 2x2."""
    torch.manual_seed(0)
    return _randomize_convnext(ConvNeXtOfficial()).eval()


def _randomize_convnext(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("layer_scale", "gamma")):
                p.copy_(torch.empty_like(p).uniform_(0.2, 1.0))
            elif p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.2)
            elif p.ndim >= 2:
                nn.init.trunc_normal_(p, std=0.2)  # unit-scale random features (the init's 0.02 is for depth)
    return model


# --------------------------------------------------------------------------------------------------
# EfficientNet, lukemelas/EfficientNet-PyTorch layout: TF "same" padding as a static nn.ZeroPad2d,
# swish (x * sigmoid(x)), squeeze-excitation with sigmoid gates; B0 widths / 4, five stages
# --------------------------------------------------------------------------------------------------
class Conv2dStaticSamePadding(nn.Conv2d):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, image_size=None, **kwargs):
        super().__init__(in_channels, out_channels, kernel_size, stride, **kwargs)
        self.stride = self.stride if len(self.stride) == 2 else [self.stride[0]] * 2
        ih, iw = (image_size, image_size) if isinstance(image_size, int) else image_size
        kh, kw = self.weight.size()[-2:]
        sh, sw = self.stride
        oh, ow = math.ceil(ih / sh), math.ceil(iw / sw)
        pad_h = max((oh - 1) * self.stride[0] + (kh - 1) * self.dilation[0] + 1 - ih, 0)
        pad_w = max((ow - 1) * self.stride[1] + (kw - 1) * self.dilation[1] + 1 - iw, 0)
        if pad_h > 0 or pad_w > 0:
            self.static_padding = nn.ZeroPad2d((pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        else:
            self.static_padding = nn.Identity()

    def forward(self, x):
        x = self.static_padding(x)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Swish(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class MBConvBlock(nn.Module):
    def __init__(self, input_filters, output_filters, kernel_size, stride, expand_ratio, se_ratio, image_size):
        super().__init__()
        bn_mom, bn_eps = 0.01, 1e-3
        self.input_filters, self.output_filters, self.stride = input_filters, output_filters, stride
        self.expand_ratio = expand_ratio
        inp, oup = input_filters, input_filters * expand_ratio
        if expand_ratio != 1:
            self._expand_conv = Conv2dStaticSamePadding(inp, oup, 1, bias=False, image_size=image_size)
            self._bn0 = nn.BatchNorm2d(oup, momentum=bn_mom, eps=bn_eps)
        self._depthwise_conv = Conv2dStaticSamePadding(oup, oup, kernel_size, stride=stride, groups=oup, bias=False,
                                                       image_size=image_size)
        self._bn1 = nn.BatchNorm2d(oup, momentum=bn_mom, eps=bn_eps)
        image_size = math.ceil(image_size / stride)
        num_squeezed_channels = max(1, int(input_filters * se_ratio))
        self._se_reduce = Conv2dStaticSamePadding(oup, num_squeezed_channels, 1, image_size=(1, 1))
        self._se_expand = Conv2dStaticSamePadding(num_squeezed_channels, oup, 1, image_size=(1, 1))
        self._project_conv = Conv2dStaticSamePadding(oup, output_filters, 1, bias=False, image_size=image_size)
        self._bn2 = nn.BatchNorm2d(output_filters, momentum=bn_mom, eps=bn_eps)
        self._swish = Swish()

    def forward(self, inputs):
        x = inputs
        if self.expand_ratio != 1:
            x = self._swish(self._bn0(self._expand_conv(inputs)))
        x = self._swish(self._bn1(self._depthwise_conv(x)))
        x_squeezed = F.adaptive_avg_pool2d(x, 1)
        x_squeezed = self._se_expand(self._swish(self._se_reduce(x_squeezed)))
        x = torch.sigmoid(x_squeezed) * x
        x = self._bn2(self._project_conv(x))
        if self.stride == 1 and self.input_filters == self.output_filters:
            x = x + inputs  # drop_connect is the identity in eval mode
        return x


class EfficientNet(nn.Module):
    # (repeats, kernel, stride, expand ratio, input filters, output filters): B0 / 4, five stages
    STAGES = [(1, 3, 1, 1, 8, 4), (2, 3, 2, 6, 4, 6), (2, 5, 2, 6, 6, 10), (1, 3, 2, 6, 10, 20),
              (2, 5, 1, 6, 20, 28)]

    def __init__(self, image_size=64, num_classes=NUM_CLASSES, head=64):
        super().__init__()
        bn_mom, bn_eps = 0.01, 1e-3
        self._conv_stem = Conv2dStaticSamePadding(3, 8, 3, stride=2, bias=False, image_size=image_size)
        self._bn0 = nn.BatchNorm2d(8, momentum=bn_mom, eps=bn_eps)
        image_size = math.ceil(image_size / 2)
        self._blocks = nn.ModuleList()
        for repeats, kernel, stride, expand, inp, oup in self.STAGES:
            for i in range(repeats):
                self._blocks.append(MBConvBlock(inp if i == 0 else oup, oup, kernel, stride if i == 0 else 1,
                                                expand, 0.25, image_size))
                image_size = math.ceil(image_size / (stride if i == 0 else 1))
        self._conv_head = Conv2dStaticSamePadding(self.STAGES[-1][5], head, 1, bias=False, image_size=image_size)
        self._bn1 = nn.BatchNorm2d(head, momentum=bn_mom, eps=bn_eps)
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(0.2)
        self._fc = nn.Linear(head, num_classes)
        self._swish = Swish()

    def forward(self, inputs):
        x = self._swish(self._bn0(self._conv_stem(inputs)))
        for block in self._blocks:
            x = block(x)
        x = self._swish(self._bn1(self._conv_head(x)))
        x = self._avg_pooling(x).flatten(start_dim=1)
        x = self._dropout(x)
        return self._fc(x)


def efficientnet() -> nn.Module:
    """EfficientNet-B0 layout as in lukemelas/EfficientNet-PyTorch: stride-2 3x3 convs on even inputs get
    nn.ZeroPad2d((0, 1, 0, 1)), the stride-2 5x5 one (1, 2, 1, 2). 64x64 input; _blocks.7 is 4x4."""
    torch.manual_seed(0)
    return _calibrate(EfficientNet(), (3, 64, 64))


# --------------------------------------------------------------------------------------------------
# SqueezeNet 1.0 (torchvision.models.squeezenet), widths / 8
# --------------------------------------------------------------------------------------------------
class Fire(nn.Module):
    def __init__(self, inplanes, squeeze_planes, expand1x1_planes, expand3x3_planes):
        super().__init__()
        self.inplanes = inplanes
        self.squeeze = nn.Conv2d(inplanes, squeeze_planes, kernel_size=1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze_planes, expand1x1_planes, kernel_size=1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze_planes, expand3x3_planes, kernel_size=3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)),
                          self.expand3x3_activation(self.expand3x3(x))], 1)


class SqueezeNet(nn.Module):
    def __init__(self, num_classes=NUM_CLASSES, dropout=0.5):
        super().__init__()
        self.num_classes = num_classes
        self.features = nn.Sequential(
            nn.Conv2d(3, 12, kernel_size=7, stride=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
            Fire(12, 4, 8, 8),
            Fire(16, 4, 8, 8),
            Fire(16, 4, 16, 16),
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
            Fire(32, 4, 16, 16),
            Fire(32, 6, 24, 24),
            Fire(48, 6, 24, 24),
            Fire(48, 8, 32, 32),
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
            Fire(64, 8, 32, 32),
        )
        final_conv = nn.Conv2d(64, num_classes, kernel_size=1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), final_conv, nn.ReLU(inplace=True),
                                        nn.AdaptiveAvgPool2d((1, 1)))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if m is final_conv:
                    nn.init.normal_(m.weight, mean=0.0, std=0.01)
                else:
                    nn.init.kaiming_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)

    def forward(self, x):
        x = self.features(x)
        x = self.classifier(x)
        return torch.flatten(x, 1)


def squeezenet() -> nn.Module:
    """SqueezeNet 1.0 (fire modules: concat of 1x1 and 3x3 expands; MaxPool2d(ceil_mode=True); a 1x1 conv
    classifier, ReLU, then AdaptiveAvgPool). 64x64 input: 29 -> 14 -> 7 (ceil: floor would give 6) -> 3.
    The final conv gets a positive bias so that no class map is entirely cut by the ReLU."""
    torch.manual_seed(0)
    model = SqueezeNet()
    with torch.no_grad():
        model.classifier[1].weight.normal_(0, 0.2)
        model.classifier[1].bias.uniform_(0.5, 1.0)
        for m in model.features.modules():
            if isinstance(m, nn.Conv2d):
                m.bias.normal_(0, 0.1)
    return model.eval()


# --------------------------------------------------------------------------------------------------
# ShuffleNetV2 (torchvision.models.shufflenetv2), widths 8-16-32-64-128, repeats (1, 2, 1)
# --------------------------------------------------------------------------------------------------
def channel_shuffle(x, groups):
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    x = x.view(batchsize, num_channels, height, width)
    return x


class ShuffleUnit(nn.Module):
    """torchvision's shufflenetv2.InvertedResidual."""

    def __init__(self, inp, oup, stride):
        super().__init__()
        self.stride = stride
        branch_features = oup // 2
        if self.stride > 1:
            self.branch1 = nn.Sequential(
                self.depthwise_conv(inp, inp, kernel_size=3, stride=self.stride, padding=1),
                nn.BatchNorm2d(inp),
                nn.Conv2d(inp, branch_features, kernel_size=1, stride=1, padding=0, bias=False),
                nn.BatchNorm2d(branch_features),
                nn.ReLU(inplace=True),
            )
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(
            nn.Conv2d(inp if (self.stride > 1) else branch_features, branch_features, kernel_size=1, stride=1,
                      padding=0, bias=False),
            nn.BatchNorm2d(branch_features),
            nn.ReLU(inplace=True),
            self.depthwise_conv(branch_features, branch_features, kernel_size=3, stride=self.stride, padding=1),
            nn.BatchNorm2d(branch_features),
            nn.Conv2d(branch_features, branch_features, kernel_size=1, stride=1, padding=0, bias=False),
            nn.BatchNorm2d(branch_features),
            nn.ReLU(inplace=True),
        )

    @staticmethod
    def depthwise_conv(i, o, kernel_size, stride=1, padding=0, bias=False):
        return nn.Conv2d(i, o, kernel_size, stride, padding, bias=bias, groups=i)

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        out = channel_shuffle(out, 2)
        return out


class ShuffleNetV2(nn.Module):
    def __init__(self, stages_repeats=(1, 2, 1), stages_out_channels=(8, 16, 32, 64, 128), num_classes=NUM_CLASSES):
        super().__init__()
        input_channels = 3
        output_channels = stages_out_channels[0]
        self.conv1 = nn.Sequential(nn.Conv2d(input_channels, output_channels, 3, 2, 1, bias=False),
                                   nn.BatchNorm2d(output_channels), nn.ReLU(inplace=True))
        input_channels = output_channels
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        stage_names = [f"stage{i}" for i in [2, 3, 4]]
        for name, repeats, output_channels in zip(stage_names, stages_repeats, stages_out_channels[1:-1], strict=True):
            seq = [ShuffleUnit(input_channels, output_channels, 2)]
            for _ in range(repeats - 1):
                seq.append(ShuffleUnit(output_channels, output_channels, 1))
            setattr(self, name, nn.Sequential(*seq))
            input_channels = output_channels
        output_channels = stages_out_channels[-1]
        self.conv5 = nn.Sequential(nn.Conv2d(input_channels, output_channels, 1, 1, 0, bias=False),
                                   nn.BatchNorm2d(output_channels), nn.ReLU(inplace=True))
        self.fc = nn.Linear(output_channels, num_classes)

    def forward(self, x):
        x = self.conv1(x)
        x = self.maxpool(x)
        x = self.stage2(x)
        x = self.stage3(x)
        x = self.stage4(x)
        x = self.conv5(x)
        x = x.mean([2, 3])  # globalpool
        x = self.fc(x)
        return x


def shufflenet_v2() -> nn.Module:
    """ShuffleNetV2 (chunk into two halves, branch, concat, channel shuffle by view/transpose/view);
    64x64 input: stage3 is 4x4, conv5 2x2."""
    torch.manual_seed(0)
    return _calibrate(ShuffleNetV2(), (3, 64, 64))


# --------------------------------------------------------------------------------------------------
# GoogLeNet (torchvision.models.googlenet) up to inception4a, widths / 8
# --------------------------------------------------------------------------------------------------
class BasicConv2d(nn.Module):
    def __init__(self, in_channels, out_channels, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        x = self.conv(x)
        x = self.bn(x)
        return F.relu(x, inplace=True)


class Inception(nn.Module):
    def __init__(self, in_channels, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj):
        super().__init__()
        self.branch1 = BasicConv2d(in_channels, ch1x1, kernel_size=1)
        self.branch2 = nn.Sequential(BasicConv2d(in_channels, ch3x3red, kernel_size=1),
                                     BasicConv2d(ch3x3red, ch3x3, kernel_size=3, padding=1))
        # torchvision keeps the 3x3 of its original port here, the "5x5" branch
        self.branch3 = nn.Sequential(BasicConv2d(in_channels, ch5x5red, kernel_size=1),
                                     BasicConv2d(ch5x5red, ch5x5, kernel_size=3, padding=1))
        self.branch4 = nn.Sequential(nn.MaxPool2d(kernel_size=3, stride=1, padding=1, ceil_mode=True),
                                     BasicConv2d(in_channels, pool_proj, kernel_size=1))

    def forward(self, x):
        outputs = [self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)]
        return torch.cat(outputs, 1)


class GoogLeNet(nn.Module):
    def __init__(self, num_classes=NUM_CLASSES, dropout=0.2):
        super().__init__()
        self.conv1 = BasicConv2d(3, 8, kernel_size=7, stride=2, padding=3)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = BasicConv2d(8, 8, kernel_size=1)
        self.conv3 = BasicConv2d(8, 24, kernel_size=3, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception3a = Inception(24, 8, 12, 16, 2, 4, 4)
        self.inception3b = Inception(32, 16, 16, 24, 4, 12, 8)
        self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception4a = Inception(60, 24, 12, 26, 2, 6, 8)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.conv1(x)
        x = self.maxpool1(x)
        x = self.conv2(x)
        x = self.conv3(x)
        x = self.maxpool2(x)
        x = self.inception3a(x)
        x = self.inception3b(x)
        x = self.maxpool3(x)
        x = self.inception4a(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.dropout(x)
        x = self.fc(x)
        return x


def googlenet() -> nn.Module:
    """GoogLeNet through inception4a (four concatenated branches, the pooling branch a padded stride-1
    MaxPool2d(ceil_mode=True)). 64x64 input: 32 -> 16 -> 8 -> 4, each ceil-mode pool overhanging by one."""
    torch.manual_seed(0)
    return _calibrate(GoogLeNet(), (3, 64, 64))


# --------------------------------------------------------------------------------------------------
# RegNetY (torchvision.models.regnet), widths 8-16-32-48, depths (1, 1, 2, 1), group width 4, SE 0.25
# --------------------------------------------------------------------------------------------------
class BottleneckTransform(nn.Sequential):
    def __init__(self, width_in, width_out, stride, group_width, bottleneck_multiplier, se_ratio):
        layers = OrderedDict()
        w_b = int(round(width_out * bottleneck_multiplier))
        g = w_b // group_width
        layers["a"] = Conv2dNormActivation(width_in, w_b, kernel_size=1, stride=1)
        layers["b"] = Conv2dNormActivation(w_b, w_b, kernel_size=3, stride=stride, groups=g)
        if se_ratio:
            width_se_out = int(round(se_ratio * width_in))
            layers["se"] = SqueezeExcitation(input_channels=w_b, squeeze_channels=width_se_out, activation=nn.ReLU)
        layers["c"] = Conv2dNormActivation(w_b, width_out, kernel_size=1, stride=1, activation_layer=None)
        super().__init__(layers)


class ResBottleneckBlock(nn.Module):
    def __init__(self, width_in, width_out, stride, group_width=4, bottleneck_multiplier=1.0, se_ratio=0.25):
        super().__init__()
        self.proj = None
        if (width_in != width_out) or (stride != 1):
            self.proj = Conv2dNormActivation(width_in, width_out, kernel_size=1, stride=stride, activation_layer=None)
        self.f = BottleneckTransform(width_in, width_out, stride, group_width, bottleneck_multiplier, se_ratio)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x):
        if self.proj is not None:
            x = self.proj(x) + self.f(x)
        else:
            x = x + self.f(x)
        return self.activation(x)


class AnyStage(nn.Sequential):
    def __init__(self, width_in, width_out, stride, depth, stage_index):
        super().__init__()
        for i in range(depth):
            block = ResBottleneckBlock(width_in if i == 0 else width_out, width_out, stride if i == 0 else 1)
            self.add_module(f"block{stage_index}-{i}", block)


class RegNet(nn.Module):
    def __init__(self, widths=(8, 16, 32, 48), depths=(1, 1, 2, 1), stem_width=8, num_classes=NUM_CLASSES):
        super().__init__()
        self.stem = Conv2dNormActivation(3, stem_width, kernel_size=3, stride=2)
        blocks, current_width = [], stem_width
        for i, (width_out, depth) in enumerate(zip(widths, depths, strict=True)):
            blocks.append((f"block{i + 1}", AnyStage(current_width, width_out, 2, depth, stage_index=i + 1)))
            current_width = width_out
        self.trunk_output = nn.Sequential(OrderedDict(blocks))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_features=current_width, out_features=num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = self.trunk_output(x)
        x = self.avgpool(x)
        x = x.flatten(start_dim=1)
        x = self.fc(x)
        return x


def regnet_y() -> nn.Module:
    """RegNetY (residual bottlenecks with grouped 3x3 convs and ReLU/Sigmoid squeeze-excitation);
    64x64 input: trunk_output.block3 is 4x4."""
    torch.manual_seed(0)
    return _calibrate(RegNet(), (3, 64, 64))


# --------------------------------------------------------------------------------------------------
# Darknet-19 (the YOLOv2 classifier, as in the darknet cfg), widths / 4
# --------------------------------------------------------------------------------------------------
def _darknet_conv(inp, out, kernel):
    return [nn.Conv2d(inp, out, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(out),
            nn.LeakyReLU(0.1, inplace=True)]


class Darknet19(nn.Module):
    def __init__(self, num_classes=NUM_CLASSES):
        super().__init__()
        self.features = nn.Sequential(
            *_darknet_conv(3, 8, 3), nn.MaxPool2d(2, 2),
            *_darknet_conv(8, 16, 3), nn.MaxPool2d(2, 2),
            *_darknet_conv(16, 32, 3), *_darknet_conv(32, 16, 1), *_darknet_conv(16, 32, 3), nn.MaxPool2d(2, 2),
            *_darknet_conv(32, 64, 3), *_darknet_conv(64, 32, 1), *_darknet_conv(32, 64, 3),
        )
        self.classifier = nn.Sequential(nn.Conv2d(64, num_classes, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(1),
                                        nn.Softmax(dim=1))

    def forward(self, x):
        return self.classifier(self.features(x))


def darknet19() -> nn.Module:
    """Darknet-19 (conv-BN-LeakyReLU(0.1), MaxPool, 1x1 bottlenecks; a 1x1 conv classifier, global average
    pool and softmax: the explained scores are probabilities). 32x32 input; features.26 is 4x4."""
    torch.manual_seed(0)
    return _calibrate(Darknet19(), (3, 32, 32))


# --------------------------------------------------------------------------------------------------
# The seed's chest X-ray classifier, scaled down
# --------------------------------------------------------------------------------------------------
class ResidualBlock(nn.Module):
    """conv3x3 stride 2 - BN - ReLU - conv3x3 - BN, plus a conv1x1 stride 2 - BN shortcut, then ReLU."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=2, bias=False),
                                      nn.BatchNorm2d(out_channels))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ChestXRayNet(nn.Module):
    def __init__(self, channels=(3, 8, 16, 32, 64, 128), kernel=2):
        super().__init__()
        self.features = nn.Sequential(*[ResidualBlock(i, o) for i, o in zip(channels[:-1], channels[1:], strict=True)])
        self.classifier = nn.Sequential(nn.Conv2d(channels[-1], 1, kernel_size=kernel, bias=False),
                                        nn.Dropout(0.2), nn.Sigmoid())

    def forward(self, x):
        return self.classifier(self.features(x))  # N x 1 x 1 x 1: one probability per image


def chest_xray() -> nn.Module:
    """The seed's chest X-ray classifier with its exact structure, scaled down: the original takes
    3x256x256 through five residual blocks 3->64->128->256->512->1024 to 8x8, then Conv2d(1024, 1,
    kernel_size=8, bias=False), Dropout(0.2), Sigmoid. Here channels are 3->8->16->32->64->128 on a
    64x64 input, down to 2x2, and the classifier is Conv2d(128, 1, kernel_size=2, bias=False). One output
    per image (N x 1 x 1 x 1), so the explained class is always 0; the sigmoid's input spans about
    -1 to 1 on random images."""
    torch.manual_seed(0)
    return _calibrate(ChestXRayNet(), (3, 64, 64))


# --------------------------------------------------------------------------------------------------
class ZooEntry(NamedTuple):
    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, int, int]
    targets: list[str]


ZOO: list[ZooEntry] = [
    ZooEntry("resnet18", resnet18, (3, 64, 64), ["layer3", "layer4"]),
    ZooEntry("resnet50", resnet50, (3, 64, 64), ["layer2", "layer4"]),
    ZooEntry("resnext_dilated", resnext_dilated, (3, 64, 64), ["layer3", "layer4"]),
    ZooEntry("vgg11", vgg11, (3, 64, 64), ["features.19"]),
    ZooEntry("vgg16_bn", vgg16_bn, (3, 64, 64), ["features.32", "features.42"]),
    ZooEntry("mobilenet_v3_small", mobilenet_v3_small, (3, 64, 64), ["features.3", "features.6"]),
    ZooEntry("mobilenet_v2", mobilenet_v2, (3, 64, 64), ["features.4", "features.7"]),
    ZooEntry("densenet", densenet, (3, 64, 64), ["features.denseblock2"]),
    ZooEntry("convnext", convnext, (3, 64, 64), ["features.5", "features.7"]),
    ZooEntry("convnext_official", convnext_official, (3, 64, 64), ["stages.2", "stages.3"]),
    ZooEntry("efficientnet", efficientnet, (3, 64, 64), ["_blocks.2", "_blocks.7"]),
    ZooEntry("squeezenet", squeezenet, (3, 64, 64), ["features.5", "features.12"]),
    ZooEntry("shufflenet_v2", shufflenet_v2, (3, 64, 64), ["stage3", "conv5"]),
    ZooEntry("googlenet", googlenet, (3, 64, 64), ["inception3a", "inception4a"]),
    ZooEntry("regnet_y", regnet_y, (3, 64, 64), ["trunk_output.block3"]),
    ZooEntry("darknet19", darknet19, (3, 32, 32), ["features.16", "features.26"]),
    ZooEntry("chest_xray", chest_xray, (3, 64, 64), ["features.2", "features.4"]),
]
