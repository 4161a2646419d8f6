"""The tufa server: factories, their TUF repositories, online signing and devices."""
