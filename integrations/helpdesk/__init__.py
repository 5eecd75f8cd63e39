"""Request Tracker 5 (REST2): the helpdesk system of engagement."""
