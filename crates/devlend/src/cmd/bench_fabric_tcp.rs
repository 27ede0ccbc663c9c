//! (under construction) tcp rows of `devlend bench fabric`.
