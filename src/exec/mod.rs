pub mod comm;
