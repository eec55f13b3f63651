"""The shape of `pipeline.yaml`: one section per component, each a frozen dataclass
declared beside the component that reads it."""
from __future__ import annotations

from dataclasses import dataclass, field

from unirec.data.config import DataConfig
from unirec.features.config import FeaturesConfig
from unirec.model.config import ModelConfig, OnlineConfig, TrainConfig
from unirec.ops.config import ExperimentsConfig, MonitoringConfig, RegistryConfig, ServingConfig
from unirec.streaming.config import KafkaConfig, StreamingConfig


@dataclass(frozen=True)
class PipelineConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    streaming: StreamingConfig = field(default_factory=StreamingConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)
    experiments: ExperimentsConfig = field(default_factory=ExperimentsConfig)
