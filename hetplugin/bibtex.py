# **************************************************************************
# *
# * hetplugin: heterogeneous reconstruction for Scipion 3
# *
# * This program is free software; you can redistribute it and/or modify
# * it under the terms of the GNU General Public License as published by
# * the Free Software Foundation; either version 3 of the License, or
# * (at your option) any later version.
# *
# **************************************************************************
"""
@article{Scheres2012a,
title = "A Bayesian View on Cryo-EM Structure Determination",
journal = "J. Mol. Biol.",
volume = "415",
number = "2",
pages = "406--418",
year = "2012",
doi = "10.1016/j.jmb.2011.11.010",
url = "https://doi.org/10.1016/j.jmb.2011.11.010",
author = "Scheres, Sjors H. W."
}

@article{Scheres2012b,
title = "RELION: Implementation of a Bayesian approach to cryo-EM structure determination",
journal = "J. Struct. Biol.",
volume = "180",
number = "3",
pages = "519--530",
year = "2012",
doi = "10.1016/j.jsb.2012.09.006",
url = "https://doi.org/10.1016/j.jsb.2012.09.006",
author = "Scheres, Sjors H. W."
}

@article{Punjani2017,
title = "cryoSPARC: algorithms for rapid unsupervised cryo-EM structure determination",
journal = "Nat. Methods",
volume = "14",
number = "3",
pages = "290--296",
year = "2017",
doi = "10.1038/nmeth.4169",
url = "https://doi.org/10.1038/nmeth.4169",
author = "Punjani, Ali and Rubinstein, John L. and Fleet, David J. and Brubaker, Marcus A."
}

@phdthesis{Zhong2022,
title = "Machine learning for reconstructing dynamic protein structures from cryo-EM images",
school = "Massachusetts Institute of Technology",
year = "2022",
author = "Zhong, Ellen D."
}

@article{Bai2015,
title = "Sampling the conformational space of the catalytic subunit of human gamma-secretase",
journal = "eLife",
volume = "4",
pages = "e11182",
year = "2015",
doi = "10.7554/eLife.11182",
url = "https://doi.org/10.7554/eLife.11182",
author = "Bai, Xiao-chen and Rajendra, Eeson and Yang, Guanghui and Shi, Yigong and Scheres, Sjors H. W."
}
"""
