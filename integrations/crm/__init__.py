"""The CRM side: a HubSpot CRM v3 objects client and the local sandbox that speaks the same subset."""
