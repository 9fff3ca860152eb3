"""Dataparser entry points (pyproject: nerfstudio.dataparser_configs).

nerfstudio loads these while its datamanager module is still importing, so this module and
everything it imports must stay at the dataparser level: no datamanager, model or pipeline.
"""

from nerfstudio.plugins.registry_dataparser import DataParserSpecification

from landmark_plugin.data.matrixcity import MatrixCityDataParserConfig
from landmark_plugin.data.synthetic_city import SyntheticCityDataParserConfig

synthetic_city = DataParserSpecification(
    config=SyntheticCityDataParserConfig(),
    description="procedural city (aerial + street views), generated into --data on first use",
)

matrixcity = DataParserSpecification(
    config=MatrixCityDataParserConfig(),
    description="MatrixCity aerial/street blocks from their transforms_{train,test}.json pose files",
)
