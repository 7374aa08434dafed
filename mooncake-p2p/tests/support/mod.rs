pub(crate) mod net_meta;
